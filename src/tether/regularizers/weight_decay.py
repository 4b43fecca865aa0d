"""Decoupled weight decay (AdamW): theta <- theta - lr * strength * theta, on weights only (no biases, no norms).

Every tensor of two or more dimensions that is not a norm's is a weight and decays: that includes the fused experts
of MoE models (one 3-D tensor holding a matrix per expert, decayed as those matrices would be one by one) and conv
kernels. Under LoRA the trainable tensors are the adapters' A and B (2-D: decayed) and a head PEFT trains whole.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import nn

from tether.regularizers.base import Regularizer, RegularizerConfig, named_params_with_module, no_decay, register


class WeightDecayConfig(RegularizerConfig):
    strength: float = Field(0.01, ge=0)
    """AdamW weight_decay of the decayed group; 0.01-0.1 is typical for fine-tuning."""


@register("weight_decay", WeightDecayConfig)
class WeightDecay(Regularizer):
    """Optimizer-level: splits every group into a decayed and a no-decay half; AdamW applies the decay."""

    def __init__(self, config: WeightDecayConfig) -> None:
        self.strength = config.strength

    def param_groups(self, model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        exempt = {id(p) for n, p, m in named_params_with_module(model) if no_decay(m, n, p)}
        out = []
        for g in groups:
            decay = [p for p in g["params"] if id(p) not in exempt]
            keep = [p for p in g["params"] if id(p) in exempt]
            out.append({**g, "params": decay, "weight_decay": self.strength, "group": f"{g['group']}/decay"})
            out.append({**g, "params": keep, "weight_decay": 0.0, "group": f"{g['group']}/no_decay"})
        return out
