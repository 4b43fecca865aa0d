"""Label smoothing as a penalty: the training loss becomes torch's label-smoothed cross-entropy, while the reported
validation loss stays the plain one (evaluation never adds penalties).

torch.nn.functional.cross_entropy(label_smoothing=alpha) is, per position that carries loss (label != -100),

    (1 - alpha) * NLL + alpha * U,   NLL = -log p_y,   U = -1/C * sum_c log p_c   (C classes, the whole vocabulary)

= NLL + alpha * (U - NLL). The model's loss is NLL, so the penalty is U - NLL with strength alpha. With z the logits,
log p_c = z_c - logsumexp(z), and the logsumexps cancel: U - NLL = z_y - mean_c z_c, so no softmax is needed. The
term is a mean over the loss positions (shifted for causal LM: logits[:, t] against labels[:, t + 1]); it can be
negative, as U < NLL when the label is one of the least likely classes. The identity is exact under gradient
accumulation too: the trainer weighs each micro-batch's penalty by its share of the loss positions, as the task
loss is weighed (RegularizedMixin._mean_scale).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from tether.reference import loss_mask
from tether.regularizers.base import Regularizer, RegularizerConfig, register


class LabelSmoothingConfig(RegularizerConfig):
    strength: float = Field(0.1, ge=0, lt=1)
    """alpha, the probability mass spread uniformly over the classes; 0.05-0.1 for LMs, 0.1-0.2 for classifiers."""


@register("label_smoothing", LabelSmoothingConfig)
class LabelSmoothing(Regularizer):
    def __init__(self, config: LabelSmoothingConfig) -> None:
        self.config = config

    def penalty(self, model: nn.Module, inputs: dict[str, Any], outputs: Any) -> torch.Tensor:
        return uniform_minus_nll(outputs.logits, inputs["labels"])


def uniform_minus_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mean over loss positions of U - NLL = z_y - mean_c z_c (module docstring), in fp32."""
    mask = loss_mask(labels)
    if labels.ndim > 1:  # causal LM: the logits at t predict the label at t + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).float()
    term = picked - logits.mean(-1, dtype=torch.float32)
    return (term * mask).sum() / mask.sum().clamp(min=1)
