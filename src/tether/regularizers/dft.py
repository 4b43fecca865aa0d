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

from tether.data import IGNORE
from tether.regularizers.base import Regularizer, RegularizerConfig, register

TokenWeights = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(fp32 logits at the loss positions [n, vocab], their NLL [n], their rows in the batch [n]) -> weights [n]
(computed without grad)."""


class DFTConfig(RegularizerConfig):
    strength: float = Field(1.0, ge=0, le=1)
    """s: the loss is (1 - s) * NLL + s * DFT; 1 is DFT as published, 0 plain SFT."""
    chunk_size: int = Field(1024, ge=1)
    """Positions per fp32 chunk (whole rows, at least one): work memory about chunk_size x vocab x 4 bytes (1024 x
    32k: 128 MB)."""


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
    """mean over the loss positions of (w_t - 1) * NLL_t, w_t = weights(logits_t, NLL_t, row_t) detached, in fp32.
    Causal LM: whole rows at a time, about `chunk` positions each, on views of the logits (no gather, whose backward
    would write a zero tensor the size of all the logits); positions without loss are computed and masked out."""
    if labels.ndim == 1:  # class labels: one position per row
        logits, labels = logits[:, None], labels[:, None]
    else:  # the logits at t predict the label at t + 1, the last ones nothing (a slice's backward would fill zeros)
        labels = torch.cat([labels[:, 1:], labels.new_full((len(labels), 1), IGNORE)], 1)
    mask = labels != IGNORE
    per_chunk = max(1, chunk // max(labels.shape[1], 1))
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, labels.shape[0], per_chunk):
        whole = start == 0 and per_chunk >= len(labels)
        z, y, m = (t if whole else t[start : start + per_chunk] for t in (logits, labels, mask))
        z = z.float()
        nll = torch.logsumexp(z, -1) - z.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
        rows = torch.arange(start, start + len(y), device=y.device)[:, None].expand_as(y)
        with torch.no_grad():
            w = weights(z, nll, rows)
        total = total + ((w - 1) * nll * m).sum()
    return total / mask.sum().clamp(min=1)
