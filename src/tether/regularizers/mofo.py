"""MoFO, momentum-filtered optimization (arXiv 2407.20999): at every step Adam updates only the fraction α of each
tensor's entries with the largest momentum |m_t|; the others keep their value. Fewer entries move, and those that move
are the ones the task keeps pushing, so the model stays closer to where it started without any anchor or penalty.

The optimizer runs as usual (its moments see every gradient, as MoFO's do); tether keeps θ_t before the step and
afterwards puts back every entry outside the top-α of |exp_avg|, per tensor (on each process's shard under FSDP2,
so the top-α is per shard there). Everything the optimizer step does is filtered, AdamW's decoupled weight decay
included; regularizers that move weights before the step (l2_sp decoupled, weight_decay) are not: the stack runs
this filter after their step_begin and before any step_end (EMA averages the filtered weights). Needs an
Adam-family optimizer (its state holds exp_avg). Memory: one copy of the trainable weights, and 9 bytes per entry of
the largest tensor for the selection.

The top-α is exact (the k-th largest |m| is found, and ties with it count), by a radix select: |m| of an fp32
number read as an int32 is monotonic in |m|, so one bincount of its top 12 bits finds the bin that holds the k-th
largest, and kthvalue runs only on that bin's entries (~1-2% of the tensor; the next 12 bits first if more remain).
Zeros that fill the rank (an embedding's rows no batch has reached) are counted, not selected. kthvalue over whole
tensors cost ~10 ms a step for 1.3M parameters on one CPU core, 12% of a step of the tiny Llama in
benchmarks/overhead.py; the filter now costs ~4 ms there.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from tether.errors import ConfigError
from tether.regularizers.anchor import shards, trainable
from tether.regularizers.base import NoPenaltyConfig, Regularizer, SetupContext, nbytes, register

SMALL = 1 << 12  # up to this many entries kthvalue over the whole tensor is as fast


class MoFOConfig(NoPenaltyConfig):
    fraction: float = Field(0.1, gt=0, le=1)
    """α: the share of each tensor's entries updated per step (0.05-0.2); 1 is the plain optimizer."""


@register("mofo", MoFOConfig)
class MoFO(Regularizer):
    touches_parameters = True
    filters_update = True

    def __init__(self, config: MoFOConfig) -> None:
        self.config = config
        self.params: list[torch.Tensor] = []
        self.before: list[torch.Tensor] = []
        self.scratch = Scratch(0, torch.device("cpu"))

    def setup(self, ctx: SetupContext) -> None:
        self.params = [p for _, p in trainable(ctx.model)]
        self.before = [torch.empty_like(t) for t in shards(self.params)]
        self.scratch = Scratch.for_tensors(self.before)

    def memory(self) -> dict[str, int]:
        return {"weights before the step": nbytes(self.before), "selection scratch": self.scratch.nbytes()}

    def step_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        torch._foreach_copy_(self.before, [t.detach() for t in shards(self.params)])

    @torch.no_grad()
    def step_end(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for p, theta, kept in zip(self.params, shards(self.params), self.before):
            state = optimizer.state.get(p, {})
            if "exp_avg" not in state:
                if p.grad is None and not state:
                    continue  # no gradient this step: the optimizer left it alone
                raise ConfigError(
                    f"mofo filters Adam's update by its momentum, and {type(optimizer).__name__} keeps none: "
                    "use an Adam-family optimizer (training.optim: adamw_torch) or remove mofo"
                )
            put_back = outside_top(shards([state["exp_avg"]])[0], self.config.fraction, self.scratch)
            if put_back is not None:
                # lerp by exactly 0 or 1 gives theta or kept bit for bit, faster than torch.where on CPU
                theta.lerp_(kept, put_back.to(theta.dtype).view(theta.shape))


class Scratch:
    """Buffers for the selection, the size of the largest tensor: fresh ones would fault their pages in at every
    step on CPU."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.magnitude = torch.empty(size, dtype=torch.float32, device=device)
        self.ints = torch.empty(size, dtype=torch.int32, device=device)
        self.mask = torch.empty(size, dtype=torch.bool, device=device)

    @classmethod
    def for_tensors(cls, tensors: list[torch.Tensor]) -> Scratch:
        return cls(max((t.numel() for t in tensors), default=0), tensors[0].device if tensors else torch.device("cpu"))

    def nbytes(self) -> int:
        return nbytes([self.magnitude, self.ints, self.mask])


def outside_top(momentum: torch.Tensor, fraction: float, scratch: Scratch | None = None) -> torch.Tensor | None:
    """Flat weights, 0.0 where |momentum| is among its ceil(fraction * n) largest entries (ties at the threshold
    all count), 1.0 elsewhere; None when that is every entry. fp32, in `scratch` (fp64 for fp64 momentum)."""
    n = momentum.numel()
    k = max(1, math.ceil(fraction * n))
    if k >= n:
        return None
    if momentum.dtype == torch.float64:  # no exact fp32 magnitude: its own int64 bits, fresh tensors
        bits, ints, mask = momentum.abs().view(torch.int64).reshape(-1), None, None
    else:
        scratch = scratch if scratch is not None and scratch.magnitude.numel() >= n else Scratch(n, momentum.device)
        magnitude, ints, mask = scratch.magnitude[:n], scratch.ints[:n], scratch.mask[:n]
        flat = momentum.reshape(-1)
        if flat.dtype == torch.float32:
            bits = torch.abs(flat, out=magnitude).view(torch.int32)
        else:
            bits = magnitude.copy_(flat).abs_().view(torch.int32)  # bf16/fp16 widen exactly
    rank = n - k + 1
    threshold = bits.kthvalue(rank).values if n <= SMALL else kth_smallest(bits, rank, ints, mask)
    if not bool(threshold):  # ties at 0 count: every entry moves (an embedding most of whose rows saw no batch)
        return None
    below = torch.lt(bits, threshold, out=mask)  # |m| below the threshold, compared exactly as integers
    return below.to(torch.float64) if ints is None else magnitude.copy_(below)


def top_fraction(momentum: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mask of the ceil(fraction * n) entries of largest |momentum|, ties at the threshold included."""
    put_back = outside_top(momentum, fraction)
    return torch.ones_like(momentum, dtype=torch.bool) if put_back is None else (put_back == 0).view(momentum.shape)


def kth_smallest(
    bits: torch.Tensor, rank: int, high: torch.Tensor | None, in_bin: torch.Tensor | None
) -> torch.Tensor:
    """The rank-th smallest (1-based) of non-negative `bits` (int32 or int64), by radix select: the histogram of
    their top 12 bits finds the bin that holds it, then the next 12 bits of that bin's entries, and so on, until few
    entries remain (kthvalue) or they are all equal. Zeros (an embedding's rows no batch has reached: most of the
    tensor) are answered by a count, not a select over them. `high`, `in_bin`: scratch the size of `bits`
    for the first level, or None."""
    shift = 8 * bits.element_size() - 1 - 12
    values = bits
    while True:
        digits = torch.bitwise_right_shift(values, shift, out=high if values is bits else None)
        if values is not bits:
            digits &= (1 << 12) - 1  # the higher bits are the same in every entry left
        below = torch.bincount(digits, minlength=1 << 12).cumsum(0)  # entries in this bin and those below
        b = int(torch.searchsorted(below, rank - 1, right=True))  # the first bin whose cumulative count reaches rank
        rank -= int(below[b - 1]) if b else 0
        if b == 0 and values.numel() - int(torch.count_nonzero(values)) >= rank:
            return values.new_zeros(())  # zeros fill the rank: an embedding's rows no batch has reached
        values = values[torch.eq(digits, b, out=in_bin if values is bits else None)]
        if values.numel() <= SMALL:
            return values.kthvalue(rank).values
        low, top = torch.aminmax(values)
        if bool(low == top) or shift == 0:
            return low
        shift = max(0, shift - 12)
