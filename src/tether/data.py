"""Loading, checking, formatting and splitting datasets; the collator that pads batches.

Rows become {input_ids, attention_mask, labels}. For causal LM, labels are the input ids with every position that
should carry no loss (the prompt, everything before the last assistant turn) set to -100.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tether.config import DataConfig
from tether.errors import DataError

IGNORE = -100
REQUIRED = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "chat": ("messages",)}


@dataclass
class Split:
    """Raw rows (for generation-based metrics) and their encoded form (for training and losses)."""

    rows: list[dict[str, Any]]
    encoded: list[dict[str, Any]]
    format: str


@dataclass
class Datasets:
    train: Split
    validation: Split
    reference: Split | None


def read_rows(source: str, field: str) -> list[dict[str, Any]]:
    """Rows of a JSONL file, a `save_to_disk` directory or a hub dataset; JSONL errors name the file and line."""
    path = Path(source).expanduser()
    if path.is_file():
        return _read_jsonl(path, field)
    if path.is_dir():
        import datasets

        return list(datasets.load_from_disk(str(path)))
    import datasets

    try:
        return list(datasets.load_dataset(source, split="train"))
    except Exception as e:  # offline, unknown id, ...: one line, not a traceback
        raise DataError(
            f"data.{field}: cannot load dataset '{source}' ({type(e).__name__}): give a JSONL file path"
        ) from None


def _read_jsonl(path: Path, field: str) -> list[dict[str, Any]]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"data.{field}: {path}:{line}: not UTF-8 text: re-encode the file as UTF-8") from None
    rows = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"data.{field}: {path}:{line_no}: invalid JSON ({e.msg}): fix or remove the line"
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"data.{field}: {path}:{line_no}: each line must be a JSON object, got {type(row).__name__}"
            )
        row["_line"] = line_no
        rows.append(row)
    if not rows:
        raise DataError(f"data.{field}: {path} holds no rows: add JSONL rows")
    return rows


def check_row(row: dict[str, Any], fmt: str, task: str, where: str) -> None:
    """Raise a DataError naming the row when it lacks a field or has one of the wrong type."""
    needed = ("text", "label") if task == "sequence_classification" else REQUIRED[fmt]
    for key in needed:
        if key not in row:
            raise DataError(f"{where}: missing field '{key}' (format {fmt} needs {', '.join(needed)})")
    if task == "sequence_classification":
        if not isinstance(row["label"], int) or isinstance(row["label"], bool):
            raise DataError(f"{where}: 'label' must be an integer class id, got {row['label']!r}")
    elif fmt == "chat":
        msgs = row["messages"]
        ok = (
            isinstance(msgs, list)
            and msgs
            and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in msgs)
        )
        if not ok or msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}} ending with an assistant turn")
        return
    for key in needed:
        if key != "label" and not isinstance(row[key], str):
            raise DataError(f"{where}: '{key}' must be a string, got {type(row[key]).__name__}")


def encode(row: dict[str, Any], fmt: str, task: str, tokenizer: Any, max_length: int) -> dict[str, Any] | None:
    """Token ids and labels of one checked row; None when truncation leaves no position with a loss."""
    if task == "sequence_classification":
        ids = tokenizer(row["text"], add_special_tokens=True)["input_ids"][:max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": row["label"]}
    if fmt == "text":
        prompt_ids, target_ids = [], tokenizer(row["text"])["input_ids"]
    elif fmt == "prompt_completion":
        # The prompt is tokenized as generation will see it (the tokenizer adds BOS if it does so by itself).
        prompt_ids, target_ids = tokenizer(row["prompt"])["input_ids"], _ids(tokenizer, row["completion"])
    else:
        prompt_ids, target_ids = _chat_ids(tokenizer, row["messages"])
    ids = (prompt_ids + target_ids + [tokenizer.eos_token_id])[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + target_ids + [tokenizer.eos_token_id])[:max_length]
    if all(label == IGNORE for label in labels):
        return None
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Everything up to the last assistant turn is the prompt; the loss is on that turn only."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise DataError("the tokenizer's chat template does not extend the prompt with the answer: use format text")
    return tokenizer(prompt)["input_ids"], _ids(tokenizer, full[len(prompt) :])


def load_split(source: str, field: str, fmt: str, task: str, tokenizer: Any, max_length: int) -> Split:
    rows = read_rows(source, field)
    kept, encoded = [], []
    for i, row in enumerate(rows):
        where = f"data.{field}: {source}:{row.get('_line', i + 1)}"
        check_row(row, fmt, task, where)
        enc = encode(row, fmt, task, tokenizer, max_length)
        if enc is not None:  # a prompt longer than max_length leaves nothing to learn from
            kept.append(row)
            encoded.append(enc)
    if not encoded:
        raise DataError(f"data.{field}: no row keeps a target token within max_length={max_length}: raise it")
    return Split(kept, encoded, fmt)


def load_datasets(cfg: DataConfig, task: str, tokenizer: Any) -> Datasets:
    """Train, validation (a file or a seeded split of train) and optional reference data, encoded."""
    train = load_split(cfg.train, "train", cfg.format, task, tokenizer, cfg.max_length)
    if cfg.validation is not None:
        validation = load_split(cfg.validation, "validation", cfg.format, task, tokenizer, cfg.max_length)
    else:
        train, validation = split_off(train, cfg.validation_fraction, cfg.seed)
    reference = None
    if cfg.reference is not None:
        fmt = cfg.reference_format or cfg.format
        reference = load_split(cfg.reference, "reference", fmt, task, tokenizer, cfg.max_length)
    return Datasets(train, validation, reference)


def split_off(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Seeded random split of rows into (train, validation); both keep at least one row."""
    if len(split.encoded) < 2:
        raise DataError("data.train has fewer than 2 usable rows: add rows or give data.validation")
    order = list(range(len(split.encoded)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(fraction * len(order))), len(order) - 1)
    val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])

    def take(idx: list[int]) -> Split:
        return Split([split.rows[i] for i in idx], [split.encoded[i] for i in idx], split.format)

    return take(train_idx), take(val_idx)


@dataclass
class Collator:
    """Right-pads input_ids (pad id), attention_mask (0) and token labels (-100); class labels become a tensor."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        batch = {
            "input_ids": torch.tensor([_pad(f["input_ids"], width, self.pad_token_id) for f in features]),
            "attention_mask": torch.tensor([_pad(f["attention_mask"], width, 0) for f in features]),
        }
        labels = [f["labels"] for f in features]
        if isinstance(labels[0], int):
            batch["labels"] = torch.tensor(labels)
        else:
            batch["labels"] = torch.tensor([_pad(lab, width, IGNORE) for lab in labels])
        return batch


def _pad(values: list[int], width: int, fill: int) -> list[int]:
    return values + [fill] * (width - len(values))
