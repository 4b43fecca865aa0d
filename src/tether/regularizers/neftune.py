"""NEFTune: uniform noise on the input embeddings during training (Jain et al., 2023).

Each embedding of row b gets noise U(-1, 1) * alpha / sqrt(L_b * d), d the embedding width and L_b the row's own
length: the number of ones in its attention_mask. Implementations that use the padded length (the batch's longest
row) give short rows in a padded batch less noise than the same rows alone; here a row's noise does not depend on
the batch it is in, and padding positions get none. The noise is added by a forward hook on
get_input_embeddings() only while that module is in training mode: evaluation, generation and the frozen reference
(run in eval mode) see the clean embeddings. A pre-hook on the model reads the attention_mask of each forward.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from tether.regularizers.base import NoPenaltyConfig, Regularizer, SetupContext, register


class NEFTuneConfig(NoPenaltyConfig):
    alpha: float = Field(5.0, gt=0)
    """The noise scale; the paper uses 5-15 (5 for 7B chat models)."""


@register("neftune", NEFTuneConfig)
class NEFTune(Regularizer):
    def __init__(self, config: NEFTuneConfig) -> None:
        self.alpha = config.alpha
        self._mask: torch.Tensor | None = None
        self.handles: list[Any] = []

    def setup(self, ctx: SetupContext) -> None:
        self.handles = [
            ctx.model.register_forward_pre_hook(self._remember_mask, with_kwargs=True),
            ctx.model.get_input_embeddings().register_forward_hook(self._add_noise),
        ]

    def _remember_mask(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._mask = kwargs.get("attention_mask")  # None when the forward got none: every position counts

    def _add_noise(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not module.training:
            return None
        return output + noise_like(output, self._mask, self.alpha)


def noise_like(embeds: torch.Tensor, mask: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """U(-1, 1) * alpha / sqrt(L_b * d) for every position of row b inside its attention mask, 0 at padding."""
    batch, width, dim = embeds.shape
    if mask is None or mask.shape != (batch, width):
        mask = torch.ones(batch, width, device=embeds.device)
    mask = mask.float()  # lengths in fp32: a bf16 sum of ones is inexact past 256
    scale = alpha / torch.sqrt(mask.sum(1, keepdim=True).clamp(min=1) * dim) * mask
    return torch.empty_like(embeds).uniform_(-1, 1) * scale.unsqueeze(-1).to(embeds.dtype)
