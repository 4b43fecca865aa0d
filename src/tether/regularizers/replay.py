"""Replay: rows of the reference data (or of a separate `source`) mixed into the training data at a given share.

The mix is made once, before the Trainer is built: the training rows plus n replayed rows, so that replayed rows
are `ratio` of the mixed set, counted in rows (`by: examples`) or in tokens that carry loss (`by: tokens`, for
classification one per row). The Trainer's sampler then shuffles the mixed set every epoch, so each batch holds
about `ratio` replayed rows; it is a plain list, so a DistributedSampler shards it across processes like any
dataset. Rows are drawn from the source in a seeded random order, the whole source once before any row repeats
(a fresh order for each pass), so the same seed gives the same mix and a small ratio still spreads over the source.
The mixed set is fixed for the run: every epoch replays the same rows (to replay more of the source, raise ratio).
How many rows and tokens were replayed is written to metrics.json under `replay`. strength is unused.

Rows of `source` are read in the reference data's format (data.reference_format, else data.format). From Python
(tether.regularize) the training and replayed rows may be lists or HF `datasets.Dataset`s (the mix is then a
Dataset), and may come without labels: the tokens that carry loss are then the completion's or assistant's
(`completion_mask`, `assistant_masks`, as TRL writes them), else every token after the first.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from typing import Any, Literal

from pydantic import Field
from torch import nn

from tether.data import IGNORE
from tether.errors import ConfigError, DataError
from tether.regularizers.base import FinishContext, NoPenaltyConfig, Regularizer, SetupContext, register

log = logging.getLogger(__name__)
Rows = Any  # a list of dict rows, or a datasets.Dataset
TOKEN_COLUMNS = {"input_ids", "attention_mask", "labels", "completion_mask", "assistant_masks", "position_ids"}


class MixConfig(NoPenaltyConfig):
    """The fields of the regularizers that mix rows into training (replay, self_replay)."""

    ratio: float = Field(0.1, gt=0, lt=1)
    """Share of replayed rows (or tokens) in the mixed training set; 0.05-0.25."""
    by: Literal["examples", "tokens"] = "examples"
    """Count the share in rows, or in tokens that carry loss (for sources whose rows are much longer or shorter)."""


class ReplayConfig(MixConfig):
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
        train: Rows,
        reference: Rows | None,
        seed: int,
        load: Callable[[str], list[dict]] | None = None,
        ctx: SetupContext | None = None,
    ) -> Rows:
        source = reference if self.config.source is None else _load(self.config.source, load)
        if source is None or len(source) == 0:
            raise ConfigError("replay needs rows to replay: set data.reference or a replay.source with rows")
        mixed, self.counts = mixed_in(train, source, self.config, seed)
        return mixed

    def after_training(self, model: nn.Module, ctx: FinishContext) -> dict[str, Any]:
        return self.counts


def mixed_in(train: Rows, source: Rows, config: MixConfig, seed: int) -> tuple[Rows, dict[str, Any]]:
    """train with rows of source mixed in as configured (mix, joined), and the counts for metrics.json."""
    picked = mix(train, source, config.ratio, config.by, seed)
    counts: dict[str, Any] = {"examples": len(picked), "share_examples": len(picked) / (len(train) + len(picked))}
    if picked and tokenized(picked[0]) and tokenized(train[0]):  # raw text rows (from Python) have no count
        tokens = sum(map(loss_tokens, picked))
        counts.update(tokens=tokens, share_tokens=tokens / (tokens + sum(map(loss_tokens, train))))
    log.info("%s: %d rows mixed into %d training rows", config.name, len(picked), len(train))
    return joined(train, picked), counts


def _load(source: str, load: Callable[[str], list[dict]] | None) -> list[dict]:
    if load is None:
        raise ConfigError("replay.source: this caller cannot read data files: pass the rows as the reference")
    return load(source)


def joined(train: Rows, picked: list[dict]) -> Rows:
    """train followed by the picked rows: a list, or a Dataset when train is one. A Dataset's columns that the
    picked rows lack are left empty when they are raw ones (a TRL-prepared set keeps its prompt/completion beside
    the input_ids and labels the collator reads); token columns must be there."""
    if isinstance(train, list):
        return train + picked
    from datasets import Dataset, concatenate_datasets

    columns = train.column_names
    missing = sorted({c for row in picked for c in columns if c not in row})
    if TOKEN_COLUMNS & set(missing):
        raise DataError(f"replay: the replayed rows lack the training data's columns {missing}: give them alike")
    added = [{c: row.get(c) for c in columns} for row in picked]
    return concatenate_datasets([train, Dataset.from_list(added, features=train.features)])


def mix(train: Rows, source: Rows, ratio: float, by: str, seed: int) -> list[dict]:
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


def cycle_shuffled(rows: Rows, seed: int) -> Iterator[dict]:
    """Every row once in a seeded random order, then again in a fresh order, forever."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(rows)))
        rng.shuffle(order)
        yield from (rows[i] for i in order)


def tokenized(row: dict) -> bool:
    return "labels" in row or "input_ids" in row


def loss_tokens(row: dict) -> int:
    """Positions that carry loss: labels other than -100 (after the first, which no logit predicts); 1 for a class;
    without labels, the completion's or assistant's tokens (TRL's masks) or every token. At least 1, so that drawing
    rows until a token count is reached always ends."""
    labels = row.get("labels")
    if isinstance(labels, int):
        return 1
    if labels is not None:
        return max(sum(label != IGNORE for label in labels[1:]), 1)
    if "input_ids" not in row:
        raise DataError(
            "replay by: tokens counts token ids, and these rows have none: tokenize them, or use by: examples"
        )
    mask = row.get("completion_mask") or row.get("assistant_masks") or [1] * len(row["input_ids"])
    return max(sum(mask[1:]), 1)
