"""Measured overfitting and forgetting: losses over whole datasets, classification scores, fact recall."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tether.data import IGNORE, Collator, Split
from tether.recall import exact_match_recall

Progress = Callable[[str, int | None], Callable[[int], None]]
"""progress(description, total) starts one progress display and returns advance(n) (tether.progress.pass_progress)."""


@torch.no_grad()
def dataset_metrics(
    model: nn.Module,
    encoded: list[dict[str, Any]],
    collator: Collator,
    batch_size: int = 32,
    advance: Callable[[int], None] | None = None,
) -> dict:
    """Token-weighted mean cross-entropy over the whole set (not a mean of batch means); for class labels also
    accuracy and macro F1. Evaluation mode: dropout off; the previous mode is restored. advance(rows) is called
    after each batch when given (a progress display)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, count, preds, golds = 0.0, 0, [], []
    for start in range(0, len(encoded), batch_size):
        batch = {k: v.to(device) for k, v in collator(encoded[start : start + batch_size]).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        if labels.ndim == 1:  # sequence classification
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            count += labels.numel()
            preds += logits.argmax(-1).tolist()
            golds += labels.tolist()
        else:
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            loss_sum += F.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                ignore_index=IGNORE, reduction="sum",
            ).item()  # fmt: skip
            count += (shift_labels != IGNORE).sum().item()
        if advance is not None:
            advance(len(labels))
    model.train(was_training)
    out = {"loss": loss_sum / max(count, 1)}
    if golds:
        out["accuracy"] = sum(p == g for p, g in zip(preds, golds)) / len(golds)
        out["f1"] = macro_f1(preds, golds)
    return out


def classification_metrics(prediction: Any) -> dict[str, float]:
    """The Trainer's compute_metrics for classifiers: accuracy and macro F1 of an evaluation's logits, logged as
    eval_accuracy and eval_f1 (what early stopping and sweeps can watch)."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    preds, golds = logits.argmax(-1).tolist(), prediction.label_ids.tolist()
    return {"accuracy": sum(p == g for p, g in zip(preds, golds)) / len(golds), "f1": macro_f1(preds, golds)}


def macro_f1(preds: list[int], golds: list[int]) -> float:
    """Unweighted mean of per-class F1 over the classes present in gold or predictions."""
    scores = []
    for c in sorted(set(golds) | set(preds)):
        tp = sum(p == c and g == c for p, g in zip(preds, golds))
        fp = sum(p == c and g != c for p, g in zip(preds, golds))
        fn = sum(p != c and g == c for p, g in zip(preds, golds))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def reference_metrics(
    model: nn.Module, tokenizer: Any, split: Split, collator: Collator, progress: Progress | None = None
) -> dict[str, float]:
    """What the model knows of the reference data: its loss, and for a fact set (prompt_completion) greedy recall.
    With `progress`, each pass shows its own display."""
    advance = start_pass(progress, "reference data: loss", len(split.encoded))
    out = {"loss": dataset_metrics(model, split.encoded, collator, advance=advance)["loss"]}
    if split.format == "prompt_completion" and split.rows and "prompt" in split.rows[0]:
        advance = start_pass(progress, "reference data: recall", len(split.rows))
        prompts, completions = [r["prompt"] for r in split.rows], [r["completion"] for r in split.rows]
        out["recall"] = exact_match_recall(model, tokenizer, prompts, completions, advance=advance)
    return out


def start_pass(progress: Progress | None, description: str, total: int) -> Callable[[int], None] | None:
    """advance(n) of a new progress display, or None without one."""
    return progress(description, total) if progress is not None else None


def forgetting(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """forgetting.* keys of metrics.json: reference loss before/after and its increase; recall when measured."""
    out = {
        "reference_loss_before": before["loss"],
        "reference_loss_after": after["loss"],
        "delta_loss": after["loss"] - before["loss"],
    }
    if "recall" in before:
        out.update(recall_before=before["recall"], recall_after=after["recall"])
        out["recall_drop"] = before["recall"] - after["recall"]
    return out


def pareto_indices(keys: list[tuple[float, ...]]) -> list[int]:
    """Indices of the points no other point dominates (at least as low on every coordinate, lower on one)."""

    def dominated(k: tuple[float, ...]) -> bool:
        return any(all(a <= b for a, b in zip(o, k)) and o != k for o in keys)

    return [i for i, k in enumerate(keys) if not dominated(k)]
