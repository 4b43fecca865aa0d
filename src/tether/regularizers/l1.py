"""L1 penalty toward zero, lambda * sum |theta|, on weights (not biases or norms).

It pushes every weight toward zero, not toward the pre-trained weights: on a pre-trained model it erodes what was
learned, so prefer l2_sp or ewc against forgetting and use l1 when sparse, small weights are the goal.
Its subgradient lambda * sign(theta) is added to the gradients with fused foreach ops once per optimizer step.
With Adam the sign gradient is normalized like any other, so weights hover near zero instead of landing on it.
"""

from __future__ import annotations

import torch
from pydantic import Field

from tether.regularizers.anchor import grad_shards, shards, with_grads, work_buffers
from tether.regularizers.base import (
    Regularizer,
    RegularizerConfig,
    SetupContext,
    nbytes,
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
        self.buffers: list[torch.Tensor] | None = None

    def setup(self, ctx: SetupContext) -> None:
        self.params = [p for _, p in trainable_weights(ctx.model)]
        self.buffers = work_buffers(self.params)

    def memory(self) -> dict[str, int]:
        return {"work buffers": nbytes(self.buffers)}

    def penalty_grad(self, scale: float) -> torch.Tensor | None:
        params, buffers = with_grads(self.params, self.buffers)
        if not params:
            return None
        with torch.no_grad():
            weights = shards(params)
            value = torch.stack(torch._foreach_norm(weights, 1, dtype=torch.float32)).sum()
            if scale:
                if buffers is None:
                    signs = torch._foreach_sign(weights)
                else:  # reuse CPU memory (see anchor.work_buffers)
                    torch._foreach_copy_(buffers, weights)
                    torch._foreach_sign_(buffers)
                    signs = buffers
                torch._foreach_add_(grad_shards(params), signs, alpha=scale)
        return value
