"""L2 penalty toward zero, lambda/2 * ||theta||^2 in the loss, on weights (not biases or norms).

Its gradient lambda * theta is known in closed form, so it is added to the gradients with one fused foreach op per
optimizer step instead of going through autograd (one pass: read theta and the gradient, write the gradient).
Unlike AdamW's decoupled decay, this gradient passes through Adam's normalization (so with Adam it is *not* the same
as weight decay; with SGD it is).
"""

from __future__ import annotations

import torch
from pydantic import Field

from tether.regularizers.anchor import accumulation_dtype, grad_shards, shards
from tether.regularizers.base import Regularizer, RegularizerConfig, SetupContext, register, trainable_weights


class L2Config(RegularizerConfig):
    strength: float = Field(1e-4, ge=0)
    """lambda; 1e-5-1e-3 for fine-tuning (the penalty grows with the parameter count)."""


@register("l2", L2Config)
class L2(Regularizer):
    touches_parameters = True

    def __init__(self, config: L2Config) -> None:
        self.params: list[torch.Tensor] = []

    def setup(self, ctx: SetupContext) -> None:
        self.params = [p for _, p in trainable_weights(ctx.model)]

    def penalty_grad(self, scale: float) -> None:
        with_grad = [p for p in self.params if p.grad is not None]
        if with_grad and scale:
            with torch.no_grad():
                torch._foreach_add_(grad_shards(with_grad), shards(with_grad), alpha=scale)

    def penalty_value(self) -> torch.Tensor | None:
        if not self.params:
            return None
        with torch.no_grad():  # sum of squares in fp32 (fp64 weights: fp64): bf16/fp16 do not lose it to rounding
            norms = torch._foreach_norm(shards(self.params), 2, dtype=accumulation_dtype(self.params))
            return 0.5 * torch.stack(norms).square().sum()
