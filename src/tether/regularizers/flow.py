"""FLOW (arXiv 2502.02797): each training row's loss is weighted by how easy the original model already finds it,

    w_i = exp(-L_i / tau) / mean_j exp(-L_j / tau),   L_i: the original model's mean token loss on row i

so that rows far from what the model knows (which would pull it furthest) count less. The weights are computed once,
at setup, by one forward pass of the model as loaded (before any training; under LoRA the adapters are still at
their initial value) over the training rows as they will train (replay's and self_replay's rows included: the
stack gives flow the rows last, Regularizer.reads_rows), and looked up by each row's content
(tether.reference.row_keys): a step costs nothing more than the plain loss.
Normalized to mean 1 over the rows, so the learning rate keeps its meaning. tau: None takes the median row loss.

With strength s the loss is (1 - s) * CE + s * FLOW, exactly FLOW at s = 1: each token of row i gets w_i (the row
weight of the token mean) in the model's one cross-entropy pass (tether.regularizers.shaping).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pydantic import Field
from torch import nn

from tether.data import IGNORE, Collator
from tether.errors import ConfigError
from tether.reference import evaluating, row_keys
from tether.regularizers.base import Regularizer, RegularizerConfig, SetupContext, register
from tether.regularizers.shaping import TokenWeights


class FLOWConfig(RegularizerConfig):
    strength: float = Field(1.0, ge=0, le=1)
    """s: the loss is (1 - s) * CE + s * FLOW; 1 is FLOW as published, 0 plain SFT."""
    temperature: float | None = Field(None, gt=0)
    """tau in exp(-L / tau); lower: sharper preference for easy rows. None: the median of the rows' losses."""
    batch_size: int = Field(16, ge=1)
    """Rows per forward of the setup pass."""


@register("flow", FLOWConfig)
class FLOW(Regularizer):
    reads_rows = True  # weighs the rows replay / self_replay mix in, wherever flow is listed

    def __init__(self, config: FLOWConfig) -> None:
        self.config = config
        self.rows: list[dict] | None = None
        self.weights: dict[bytes, float] = {}

    def train_data(
        self,
        train: list[dict],
        reference: list[dict] | None,
        seed: int,
        load: Callable[[str], list[dict]] | None = None,
        ctx: SetupContext | None = None,
    ) -> list[dict]:
        self.rows = list(train)  # weighted at setup, where the model is at hand
        return train

    def setup(self, ctx: SetupContext) -> None:
        if self.rows is None:
            raise ConfigError(
                "flow weighs the training rows: give them to the stack (RegularizerStack.train_data) before setup"
            )
        if any("labels" not in row for row in self.rows[:1]):
            raise ConfigError(
                "flow weighs each training row by its labelled tokens: give rows with labels (tether's encoding), "
                "or remove flow"
            )
        what = "flow: the original model's loss per training row"
        advance = ctx.progress(what, len(self.rows)) if ctx.progress else None
        keys, losses = row_losses(ctx.model, self.rows, self.config.batch_size, advance)
        tau = self.config.temperature or float(losses.median().clamp(min=1e-6))
        w = torch.exp(-(losses - losses.min()) / tau)  # shifted: the same weights once normalized, never all 0
        w = w / w.mean()
        self.weights = dict(zip(keys, w.tolist()))
        self.rows = None  # the weights are all that is kept

    def token_weights(self, inputs: dict[str, Any]) -> TokenWeights:
        keys = row_keys(inputs)
        missing = [i for i, k in enumerate(keys) if k not in self.weights]
        if missing:
            raise ConfigError(
                "flow: a training batch holds a row it did not weigh at setup (another collator, or packing): train "
                "on the rows given to the stack, unpacked, or remove flow"
            )
        per_row = torch.tensor([self.weights[k] for k in keys], device=inputs["labels"].device)
        return lambda logits, nll, rows: per_row[rows]

    def memory(self) -> dict[str, int]:
        return {"row weights": 24 * len(self.weights)}


@torch.no_grad()
def row_losses(
    model: nn.Module, rows: list[dict], batch_size: int, advance: Callable[[int], None] | None
) -> tuple[list[bytes], torch.Tensor]:
    """(row_keys, mean token cross-entropy) of every row under the model as it is, in eval mode."""
    device = next(model.parameters()).device
    collate, keys, losses = Collator(0), [], []
    with evaluating(model):
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size])
            keys += row_keys(batch)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits, labels = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float(), batch["labels"]
            losses.append(per_row_loss(logits, labels))
            if advance is not None:
                advance(len(batch["labels"]))
    return keys, torch.cat(losses).cpu()


def per_row_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each row over its loss positions (causal LM shifted; class labels: one per row)."""
    if labels.ndim == 1:
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    logits, labels = logits[:, :-1], labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    mask = labels != IGNORE
    return (nll * mask).sum(1) / mask.sum(1).clamp(min=1)  # 0 for a row without loss tokens
