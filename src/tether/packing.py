"""Long rows cut into windows, short rows packed together, and the padding a batching leaves.

Windows: a token sequence longer than max_length becomes windows of max_length tokens that start every
`max_length - overlap` tokens; the first `overlap` tokens of each later window are context only (label -100), so
every token carries loss once.

Packing follows transformers' DataCollatorWithFlattening: the rows of a packed example lie one after the other,
`position_ids` restart at 0 for each, there is no attention_mask, and the first label of each row is -100 (it would
be predicted from the row before). Given position_ids and no attention_mask, transformers' mask builder
(masking_utils.find_packed_sequence_indices) keeps sdpa / eager / flex attention inside each row, and the flash
attention kernels read the same position_ids as sequence boundaries (for a batch of one row: `flatten`).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tether.errors import ConfigError

IGNORE = -100


def windows(ids: list[int], labels: list[int], max_length: int, overlap: int) -> list[dict[str, Any]]:
    """Examples of at most max_length tokens covering the whole sequence; overlap tokens repeat as context."""
    stride = max_length - overlap
    out, start = [], 0
    while True:
        end = min(start + max_length, len(ids))
        context = min(overlap, end - start) if start else 0
        window_labels = [IGNORE] * context + labels[start + context : end]
        out.append({"input_ids": ids[start:end], "attention_mask": [1] * (end - start), "labels": window_labels})
        if end == len(ids):
            return out
        start += stride


def pack(examples: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Best-fit decreasing: each example (longest first) goes into the fullest bin it fits; a bin is one packed
    example of at most max_length tokens with restarting position_ids and the first label of each row -100."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        size = len(examples[i]["input_ids"])
        at = bisect.bisect_left(free, (size, -1))
        if at == len(free):
            bins.append([i])
            bisect.insort(free, (max_length - size, len(bins) - 1))
            continue
        room, b = free.pop(at)
        bins[b].append(i)
        bisect.insort(free, (room - size, b))
    return [_join([examples[i] for i in members]) for members in bins]


def _join(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ids, labels, positions = [], [], []
    for row in rows:
        ids += row["input_ids"]
        labels += [IGNORE, *row["labels"][1:]]
        positions += range(len(row["input_ids"]))
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def padding_share(lengths: list[int], batch_size: int, seed: int = 0) -> float:
    """Share of padding in the batches of a seeded shuffle (as the Trainer draws them), each padded to its longest."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    real = padded = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        real += sum(batch)
        padded += max(batch) * len(batch)
    return 1 - real / padded if padded else 0.0


@torch.no_grad()
def check_packing(model: nn.Module, collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]) -> None:
    """Packed training needs attention kept inside each row: a probe of two short rows packed together must give the
    logits each gives alone, else a ConfigError. Turns the model's KV cache off, as the Trainer does in training
    (with a cache, transformers does not look for packed rows)."""
    model.config.use_cache = False
    rows = [list(range(4, 11)), list(range(12, 17))]
    device = next(model.parameters()).device
    packed = collate([_join([{"input_ids": r, "labels": r} for r in rows])])
    was_training = model.training
    model.eval()  # no dropout: the two passes must be comparable
    alone = torch.cat([model(input_ids=torch.tensor([r], device=device)).logits[0] for r in rows]).float()
    together = model(**{k: v.to(device) for k, v in packed.items() if k != "labels"}).logits.float()
    model.train(was_training)
    tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    if not torch.allclose(alone, together.reshape(-1, alone.shape[-1])[: len(alone)], atol=tolerance, rtol=tolerance):
        kind = f"{model.config.model_type} ({model.config._attn_implementation} attention)"
        raise ConfigError(f"data.packing: {kind} does not keep packed rows apart: set data.packing false")
