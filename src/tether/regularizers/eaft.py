"""EAFT, entropy-adaptive fine-tuning (arXiv 2601.02151): each loss token's cross-entropy is scaled by how uncertain
the model's own prediction is there, the entropy of its top-K distribution normalized to [0, 1], detached:

    EAFT = mean_t sg(H_K(z_t) / log K) * NLL_t,   H_K: entropy of softmax over the K largest logits at t

Tokens the model already predicts confidently (low entropy: knowledge it holds, right or wrong) move it less, so a
new task overwrites less of what it knew; uncertain tokens learn at full rate. As for dft, the penalty is
EAFT - NLL with strength s: the loss is (1 - s) * NLL + s * EAFT, exactly EAFT at s = 1, computed in the model's
one cross-entropy pass (tether.regularizers.shaping); the top-K is one more pass over the logits, without grad.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field

from tether.regularizers.base import Regularizer, RegularizerConfig, register
from tether.regularizers.shaping import TokenWeights


class EAFTConfig(RegularizerConfig):
    strength: float = Field(1.0, ge=0, le=1)
    """s: the loss is (1 - s) * NLL + s * EAFT; 1 is EAFT as published, 0 plain SFT."""
    top_k: int = Field(20, ge=2)
    """K, the logits the entropy is taken over (normalized by log K)."""


@register("eaft", EAFTConfig)
class EAFT(Regularizer):
    def __init__(self, config: EAFTConfig) -> None:
        self.config = config

    def token_weights(self, inputs: dict[str, Any]) -> TokenWeights:
        return lambda logits, nll, rows: top_k_entropy(logits, self.config.top_k)


def top_k_entropy(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Entropy of the softmax over the k largest logits, divided by log k (in [0, 1]); k capped at the classes."""
    k = min(k, logits.shape[-1])
    log_p = torch.log_softmax(logits.topk(k, dim=-1).values, dim=-1)
    return -(log_p.exp() * log_p).sum(-1) / math.log(k)
