"""L1 penalty toward zero, lambda * sum |theta|, on weights (not biases or norms).

It pushes every weight toward zero, not toward the pre-trained weights: on a pre-trained model it erodes what was
learned, so prefer l2_sp or ewc against forgetting and use l1 when sparse, small weights are the goal.
Its subgradient lambda * sign(theta) is added to the gradients once per optimizer step (two passes: the signs, then
one fused add).
With Adam the sign gradient is normalized like any other, so weights hover near zero instead of landing on it.
"""

from __future__ import annotations

import torch
from pydantic import Field

from tether.regularizers.anchor import accumulation_dtype, grad_shards, scratch, scratch_bytes, shards, with_grads
from tether.regularizers.base import (
    Regularizer,
    RegularizerConfig,
    SetupContext,
    register,
    trainable_weights,
)


class L1Config(RegularizerConfig):
    strength: float = Field(1e-5, ge=0)
    """lambda; 1e-6-1e-4 for fine-tuning with Adam (compare with the size of a weight's gradient)."""


@register("l1", L1Config)
class L1(Regularizer):
    touches_parameters = True

    def __init__(self, config: L1Config) -> None:
        self.params: list[torch.Tensor] = []
        self.views: list[torch.Tensor] | None = None

    def setup(self, ctx: SetupContext) -> None:
        self.params = [p for _, p in trainable_weights(ctx.model)]
        if all(p.dtype == torch.float32 for p in self.params):  # the scratch is fp32: it cannot hold bf16 signs
            self.views = scratch(self.params)

    def memory(self) -> dict[str, int]:
        return {"work buffer": scratch_bytes(self.views)}

    def penalty_grad(self, scale: float) -> None:
        params, views = with_grads(self.params, self.views)
        if not params or not scale:
            return
        with torch.no_grad():
            weights, grads = shards(params), grad_shards(params)
            if views is None:
                torch._foreach_add_(grads, torch._foreach_sign(weights), alpha=scale)
                return
            for weight, grad, view in zip(weights, grads, views):  # tensor by tensor on CPU: see anchor.scratch
                grad.add_(torch.sign(weight, out=view), alpha=scale)

    def penalty_value(self) -> torch.Tensor | None:
        if not self.params:
            return None
        with torch.no_grad():
            dtype = accumulation_dtype(self.params)
            return torch.stack(torch._foreach_norm(shards(self.params), 1, dtype=dtype)).sum()
