"""ASFT, anchored supervised fine-tuning (arXiv 2509.23753): DFT's token reweighting (tether.regularizers.dft) with
a KL anchor to the original model, which keeps DFT from drifting away from the distribution it starts from:

    loss = CE + strength * ((DFT - CE) + anchor * KL(model || original))

exactly DFT + anchor * KL at strength 1. The DFT weights shape the model's one cross-entropy pass
(tether.regularizers.shaping); the anchor, asft's penalty, is kl's computation (reverse KL per loss position at T = 1,
through the shared frozen reference: the model with its adapters off under LoRA, one reference forward per batch
with kl/distill, the row cache), so no second full model is loaded for it.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from tether.regularizers.base import register
from tether.regularizers.dft import probability
from tether.regularizers.kl import KL, KLConfig
from tether.regularizers.shaping import TokenWeights


class ASFTConfig(KLConfig):
    strength: float = Field(1.0, ge=0, le=1)
    """s: the loss is CE + s * ((DFT - CE) + anchor * KL); 1 is ASFT as published, 0 plain SFT."""
    anchor: float = Field(0.1, ge=0)
    """lambda: the weight of KL(model || original) beside the DFT term (kl's range: 0.01-0.5)."""


@register("asft", ASFTConfig)
class ASFT(KL):
    def token_weights(self, inputs: dict[str, Any]) -> TokenWeights:
        return probability

    def penalty(self, model: nn.Module, inputs: dict[str, Any], outputs: Any) -> torch.Tensor:
        return self.config.anchor * super().penalty(model, inputs, outputs)
