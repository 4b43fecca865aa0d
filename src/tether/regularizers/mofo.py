"""MoFO, momentum-filtered optimization (arXiv 2407.20999): at every step Adam updates only the fraction α of each
tensor's entries with the largest momentum |m_t|; the others keep their value. Fewer entries move, and those that move
are the ones the task keeps pushing, so the model stays closer to where it started without any anchor or penalty.

The optimizer runs as usual (its moments see every gradient, as MoFO's do); tether keeps θ_t before the step and
afterwards puts back every entry outside the top-α of |exp_avg|, per tensor (on each process's shard under FSDP2,
so the top-α is per shard there). Everything the optimizer step does is filtered, AdamW's decoupled weight decay
included; regularizers that move weights before the step (l2_sp decoupled, weight_decay) are not: the stack runs
this filter after their step_begin and before any step_end (EMA averages the filtered weights). Needs an
Adam-family optimizer (its state holds exp_avg). Memory: one copy of the trainable weights.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from tether.errors import ConfigError
from tether.regularizers.anchor import shards, trainable
from tether.regularizers.base import NoPenaltyConfig, Regularizer, SetupContext, nbytes, register


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

    def setup(self, ctx: SetupContext) -> None:
        self.params = [p for _, p in trainable(ctx.model)]
        self.before = [torch.empty_like(t) for t in shards(self.params)]

    def memory(self) -> dict[str, int]:
        return {"weights before the step": nbytes(self.before)}

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
            moved = top_fraction(shards([state["exp_avg"]])[0], self.config.fraction)
            if moved is not None:
                torch.where(moved, theta, kept, out=theta)  # in place: no temporary the size of the tensor


def top_fraction(momentum: torch.Tensor, fraction: float) -> torch.Tensor | None:
    """Mask of the ceil(fraction * n) entries of largest |momentum| (ties at the threshold all count); None when
    that is every entry."""
    magnitude = momentum.detach().abs()
    n = magnitude.numel()
    k = max(1, math.ceil(fraction * n))
    if k >= n:
        return None
    threshold = magnitude.reshape(-1).kthvalue(n - k + 1).values
    return magnitude >= threshold
