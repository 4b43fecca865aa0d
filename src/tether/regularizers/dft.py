"""DFT, dynamic fine-tuning (arXiv 2508.05629): each loss token's cross-entropy is scaled by the model's own
probability of that token, detached, so that tokens the model finds very unlikely stop dominating the gradient
(read as an RL update, plain SFT weights each token by 1/p; DFT cancels that).

    DFT = mean_t sg(p_t) * NLL_t,   NLL_t = -log p_t,   p_t = softmax(z_t)[y_t]

As a penalty on top of the model's loss (the mean NLL) it is DFT - NLL = mean_t (sg(p_t) - 1) * NLL_t with strength
s: the training loss is NLL + s * (DFT - NLL), plain SFT at s = 0 and exactly DFT at s = 1 (values between mix the
two). Validation losses stay the plain NLL: evaluation never adds penalties. Positions are the loss positions
(shifted for causal LM); class labels of a classifier work the same way. The weights are detached, so the gradient
is sg(p_t) times the NLL's: one logsumexp per loss position, in fp32, chunked like distill's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pydantic import Field
from torch import nn

from tether.reference import at_positions, loss_positions
from tether.regularizers.base import Regularizer, RegularizerConfig, register

TokenWeights = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(fp32 logits at the loss positions [n, vocab], their NLL [n], their rows in the batch [n]) -> weights [n]
(computed without grad)."""


class DFTConfig(RegularizerConfig):
    strength: float = Field(1.0, ge=0, le=1)
    """s: the loss is (1 - s) * NLL + s * DFT; 1 is DFT as published, 0 plain SFT."""
    chunk_size: int = Field(1024, ge=1)
    """Loss positions per fp32 chunk: work memory is about chunk_size x vocab x 4 bytes (1024 x 32k: 128 MB)."""


@register("dft", DFTConfig)
class DFT(Regularizer):
    def __init__(self, config: DFTConfig) -> None:
        self.config = config

    def penalty(self, model: nn.Module, inputs: dict[str, Any], outputs: Any) -> torch.Tensor:
        return reweighted_minus_nll(outputs.logits, inputs["labels"], probability, self.config.chunk_size)


def probability(logits: torch.Tensor, nll: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """DFT's weight: the model's probability of the label, exp(-NLL)."""
    return torch.exp(-nll)


def reweighted_minus_nll(
    logits: torch.Tensor, labels: torch.Tensor, weights: TokenWeights, chunk: int
) -> torch.Tensor:
    """mean over the loss positions of (w_t - 1) * NLL_t, w_t = weights(logits_t, NLL_t) detached (fp32, chunked)."""
    rows, cols = loss_positions(labels)
    targets = labels[rows, cols + 1] if labels.ndim > 1 else labels[rows]
    picked = at_positions(logits, rows, cols)  # [n, vocab] in the model's dtype; fp32 a chunk at a time
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, picked.shape[0], chunk):
        z = picked[start : start + chunk].float()
        nll = torch.logsumexp(z, -1) - z.gather(-1, targets[start : start + chunk, None]).squeeze(-1)
        with torch.no_grad():
            w = weights(z, nll, rows[start : start + chunk])
        total = total + ((w - 1) * nll).sum()
    return total / max(picked.shape[0], 1)
