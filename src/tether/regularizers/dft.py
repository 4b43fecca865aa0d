"""DFT, dynamic fine-tuning (arXiv 2508.05629): each loss token's cross-entropy is scaled by the model's own
probability of that token, detached, so that tokens the model finds very unlikely stop dominating the gradient
(read as an RL update, plain SFT weights each token by 1/p; DFT cancels that).

    DFT = mean_t sg(p_t) * NLL_t,   NLL_t = -log p_t,   p_t = softmax(z_t)[y_t] = exp(-NLL_t)

With strength s the training loss is (1 - s) * NLL + s * DFT: plain SFT at s = 0, exactly DFT at s = 1. The stack
computes it in the model's one cross-entropy pass (tether.regularizers.shaping); `reg/dft` logs DFT - NLL.
Validation losses stay the plain NLL: evaluation never shapes the loss. Class labels of a classifier work the same
way.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from tether.regularizers.base import Regularizer, RegularizerConfig, register
from tether.regularizers.shaping import TokenWeights


class DFTConfig(RegularizerConfig):
    strength: float = Field(1.0, ge=0, le=1)
    """s: the loss is (1 - s) * NLL + s * DFT; 1 is DFT as published, 0 plain SFT."""


@register("dft", DFTConfig)
class DFT(Regularizer):
    def __init__(self, config: DFTConfig) -> None:
        self.config = config

    def token_weights(self, inputs: dict[str, Any]) -> TokenWeights:
        return probability


def probability(logits: torch.Tensor, nll: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """DFT's weight: the model's probability of the label, exp(-NLL)."""
    return torch.exp(-nll)
