"""Replay: rows of the reference data (or of a separate `source`) mixed into the training data at a given share.

The mix is made once, before the Trainer is built: the training rows plus n replayed rows, so that replayed rows
are `ratio` of the mixed set, counted in rows (`by: examples`) or in tokens that carry loss (`by: tokens`, for
classification one per row). The Trainer's sampler then shuffles the mixed set every epoch, so each batch holds
about `ratio` replayed rows; it is a plain list, so a DistributedSampler shards it across processes like any
dataset. Rows are drawn from the source in a seeded random order, the whole source once before any row repeats
(a fresh order for each pass), so the same seed gives the same mix and a small ratio still spreads over the source.
The mixed set is fixed for the run: every epoch replays the same rows (to replay more of the source, raise ratio).
How many rows and tokens were replayed is written to metrics.json under `replay`. strength is unused.

Rows of `source` are read in the reference data's format (data.reference_format, else data.format).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from typing import Any, Literal

from pydantic import Field
from torch import nn

from tether.data import IGNORE
from tether.errors import ConfigError
from tether.regularizers.base import FinishContext, NoPenaltyConfig, Regularizer, register

log = logging.getLogger(__name__)


class ReplayConfig(NoPenaltyConfig):
    ratio: float = Field(0.1, gt=0, lt=1)
    """Share of replayed rows (or tokens) in the mixed training set; 0.05-0.25."""
    by: Literal["examples", "tokens"] = "examples"
    """Count the share in rows, or in tokens that carry loss (for sources whose rows are much longer or shorter)."""
    source: str | None = None
    """Data to replay (JSONL file, save_to_disk directory or hub id); None: data.reference."""

    def without_reference_data(self) -> str | None:
        return "replay needs rows to replay: set data.reference or replay.source" if self.source is None else None


@register("replay", ReplayConfig)
class Replay(Regularizer):
    def __init__(self, config: ReplayConfig) -> None:
        self.config = config
        self.counts: dict[str, Any] = {}

    def train_data(
        self,
        train: list[dict],
        reference: list[dict] | None,
        seed: int,
        load: Callable[[str], list[dict]] | None = None,
    ) -> list[dict]:
        source = reference if self.config.source is None else _load(self.config.source, load)
        if not source:
            raise ConfigError("replay needs rows to replay: set data.reference or a replay.source with rows")
        picked = mix(train, source, self.config.ratio, self.config.by, seed)
        self.counts = {
            "examples": len(picked),
            "tokens": sum(map(loss_tokens, picked)),
            "share_examples": len(picked) / (len(train) + len(picked)),
        }
        self.counts["share_tokens"] = self.counts["tokens"] / (self.counts["tokens"] + sum(map(loss_tokens, train)))
        log.info("replay: %d rows (%d loss tokens) mixed into %d training rows", len(picked), self.counts["tokens"],
                 len(train))  # fmt: skip
        return train + picked

    def after_training(self, model: nn.Module, ctx: FinishContext) -> dict[str, Any]:
        return self.counts


def _load(source: str, load: Callable[[str], list[dict]] | None) -> list[dict]:
    if load is None:
        raise ConfigError("replay.source: this caller cannot read data files: pass the rows as the reference")
    return load(source)


def mix(train: list[dict], source: list[dict], ratio: float, by: str, seed: int) -> list[dict]:
    """The rows to add so that they are `ratio` of train + them: n = round(r / (1 - r) * len(train)) rows, or, by
    tokens, rows until their loss tokens reach r / (1 - r) of the training rows' (overshooting by under one row)."""
    share = ratio / (1 - ratio)
    rows = cycle_shuffled(source, seed)
    if by == "examples":
        return [next(rows) for _ in range(round(share * len(train)))]
    target, picked, tokens = share * sum(map(loss_tokens, train)), [], 0
    while tokens < target:
        picked.append(next(rows))
        tokens += loss_tokens(picked[-1])
    return picked


def cycle_shuffled(rows: list[dict], seed: int) -> Iterator[dict]:
    """Every row once in a seeded random order, then again in a fresh order, forever."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(rows)))
        rng.shuffle(order)
        yield from (rows[i] for i in order)


def loss_tokens(row: dict) -> int:
    """Positions that carry loss: labels other than -100 (after the first, which no logit predicts); 1 for a class.
    At least 1, so that drawing rows until a token count is reached always ends."""
    labels = row["labels"]
    return 1 if isinstance(labels, int) else max(sum(label != IGNORE for label in labels[1:]), 1)
