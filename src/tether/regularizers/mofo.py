"""MoFO, momentum-filtered optimization (arXiv 2407.20999): at every step Adam updates only the fraction α of each
tensor's entries with the largest momentum |m_t|; the others keep their value. Fewer entries move, and those that move
are the ones the task keeps pushing, so the model stays closer to where it started without any anchor or penalty.

The optimizer runs as usual (its moments see every gradient, as MoFO's do); tether keeps θ_t before the step and
afterwards puts back every entry outside the top-α of |exp_avg|, per tensor (on each process's shard under FSDP2,
so the top-α is per shard there). Everything the optimizer step does is filtered, AdamW's decoupled weight decay
included; regularizers that move weights before the step (l2_sp decoupled, weight_decay) are not: the stack runs
this filter after their step_begin and before any step_end (EMA averages the filtered weights). Needs an
Adam-family optimizer (its state holds exp_avg). Memory: one copy of the trainable weights, and 7 bytes per entry of
the largest tensor for the selection.

The top-alpha is exact (the k-th largest |m| is found, and ties with it count), by a radix select: the top 16 bits of
an fp32 (or bf16, fp64) number, sign dropped, are ordered as |m| is, and they are a strided view of the tensor, so one
bincount of them finds the bin that holds the k-th largest; only that bin's entries (about 0.2% of a tensor) are
gathered for the rest of the bits. Zeros that fill the rank (an embedding's rows no batch has reached) are counted, not
selected. A step of the 58M-parameter Llama in benchmarks/gpu.py (on one CPU core) is 1.06x plain with it, 1.18x
with kthvalue over whole tensors, 1.08-1.10x with a first level of 12 bits from a copy of |m| (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
import sys

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
        self.top = torch.empty(size, dtype=torch.int16, device=device)
        self.mask = torch.empty(size, dtype=torch.bool, device=device)
        self.weight = torch.empty(size, dtype=torch.float32, device=device)

    @classmethod
    def for_tensors(cls, tensors: list[torch.Tensor]) -> Scratch:
        return cls(max((t.numel() for t in tensors), default=0), tensors[0].device if tensors else torch.device("cpu"))

    def nbytes(self) -> int:
        return nbytes([self.top, self.mask, self.weight])


def outside_top(momentum: torch.Tensor, fraction: float, scratch: Scratch | None = None) -> torch.Tensor | None:
    """Flat fp32 weights, 0.0 where |momentum| is among its ceil(fraction * n) largest entries (ties at the
    threshold all count), 1.0 elsewhere; None when that is every entry. In `scratch` when it is large enough."""
    n = momentum.numel()
    k = max(1, math.ceil(fraction * n))
    if k >= n:
        return None
    flat, rank = momentum.reshape(-1), n - k + 1  # the threshold is the rank-th smallest |m|
    if n <= SMALL:
        bits = magnitude_bits(flat)
        threshold = bits.kthvalue(rank).values
        return None if not bool(threshold) else torch.lt(bits, threshold).float()
    scratch = scratch if scratch is not None and scratch.top.numel() >= n else Scratch(n, momentum.device)
    top = torch.bitwise_and(high_half(flat), 0x7FFF, out=scratch.top[:n])  # |m|'s top 15 bits, monotonic in |m|
    below = torch.bincount(top, minlength=1 << 15).cumsum(0)  # entries in each bin and those below it
    b = int(torch.searchsorted(below, rank - 1, right=True))  # the bin that holds the threshold
    rank -= int(below[b - 1]) if b else 0
    if b == 0 and n - int(torch.count_nonzero(flat)) >= rank:
        return None  # ties at 0 count, so every entry moves: an embedding most of whose rows no batch has reached
    in_bin = torch.eq(top, b, out=scratch.mask[:n]).nonzero().squeeze(1)
    values = magnitude_bits(flat[in_bin])
    put_back = torch.lt(top, b, out=scratch.weight[:n])  # the bins below the threshold's, then its entries below it
    put_back[in_bin[values < kth_smallest(values, rank)]] = 1.0
    return put_back


def top_fraction(momentum: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mask of the ceil(fraction * n) entries of largest |momentum|, ties at the threshold included."""
    put_back = outside_top(momentum, fraction)
    return torch.ones_like(momentum, dtype=torch.bool) if put_back is None else (put_back == 0).view(momentum.shape)


def high_half(x: torch.Tensor) -> torch.Tensor:
    """The most significant 16 bits of each element (sign, exponent, the mantissa's top bits) as int16: a view."""
    halves = x.view(torch.int16).view(-1, x.element_size() // 2)
    return halves[:, -1 if sys.byteorder == "little" else 0]


def magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """|x|'s bits as a non-negative integer as wide as x: ordered as |x| is."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    return x.view(ints) & torch.iinfo(ints).max


def kth_smallest(values: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-th smallest (1-based) of non-negative integers that agree in their top 16 bits: a radix select on
    the next 16 bits at a time (bincount, keep the bin that holds it) until few remain or no bits are left."""
    shift = 8 * values.element_size() - 16
    while values.numel() > SMALL and shift > 0:
        shift -= 16
        digits = torch.bitwise_right_shift(values, shift) & 0xFFFF
        below = torch.bincount(digits, minlength=1 << 16).cumsum(0)
        b = int(torch.searchsorted(below, rank - 1, right=True))
        rank -= int(below[b - 1]) if b else 0
        values = values[digits == b]
    return values[0] if values.numel() > SMALL else values.kthvalue(rank).values  # more than SMALL: all equal
