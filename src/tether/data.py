"""Loading, checking, formatting and splitting datasets; the collator that pads (or packs) batches.

Rows become examples {input_ids, attention_mask, labels}. For causal LM, labels are the input ids with every position
that should carry no loss (the prompt, user and system turns, window context) set to -100. A `text` row longer than
max_length becomes several windows (tether.packing.windows); other rows are cut at max_length, and what was split,
cut or dropped is counted (SplitStats).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tether.distributed import rank, world_size
from tether.errors import DataError
from tether.packing import IGNORE, pack, padding_share, windows

if TYPE_CHECKING:  # the regularizers import this module, and tether.config imports them
    from tether.config import DataConfig, RunConfig

REQUIRED = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "chat": ("messages",)}
__all__ = ["IGNORE", "Collator", "Datasets", "Labels", "Split", "encode", "label_space", "load_datasets"]


@dataclass
class SplitStats:
    """What reading a split did to its rows."""

    rows: int = 0
    """Rows read."""
    examples: int = 0
    """Examples made (a long text row gives several windows)."""
    tokens: int = 0
    """Tokens of the examples (window context counted in each window)."""
    split: int = 0
    """Text rows longer than max_length, cut into windows."""
    truncated: int = 0
    """Rows cut at max_length (their tail lost)."""
    dropped: int = 0
    """Rows left with no token to learn from (a prompt as long as max_length)."""


@dataclass
class Split:
    """Raw rows (for generation-based metrics) and their encoded examples (for training and losses); rows[i] is the
    row encoded[i] came from (a windowed row is repeated once per window)."""

    rows: list[dict[str, Any]]
    encoded: list[dict[str, Any]]
    format: str
    stats: SplitStats = field(default_factory=SplitStats)


@dataclass
class Datasets:
    train: Split
    validation: Split
    reference: Split | None
    labels: Labels | None = None
    """The classes the rows were encoded with (classification): other files of the run are read with them."""


@dataclass(frozen=True)
class Labels:
    """The classes of a classification run: how many, and their names when the data labels them by name."""

    num_labels: int
    names: tuple[str, ...] | None = None

    def id_of(self, label: Any, where: str) -> int:
        """The class id of a row's label, or a DataError naming the row."""
        if self.names is not None:
            if label not in self.names:
                raise DataError(f"{where}: label {label!r} is not one of {', '.join(self.names)}: fix the row")
            return self.names.index(label)
        _check_label_value(label, where)
        if isinstance(label, str):
            raise DataError(f"{where}: label {label!r} is a name but the classes are numbered: use an integer")
        if label >= self.num_labels:
            raise DataError(
                f"{where}: label {label} is out of range for {self.num_labels} classes (0..{self.num_labels - 1}): "
                "fix the row or set model.num_labels"
            )
        return label

    @classmethod
    def of_model(cls, config: Any) -> Labels:
        """The classes a saved classifier was trained with (named when its config names them)."""
        names = tuple(config.id2label[i] for i in range(config.num_labels))
        numbered = all(name == f"LABEL_{i}" for i, name in enumerate(names))
        return cls(config.num_labels, None if numbered else names)


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
    # Lines end at \n only: str.splitlines would also split at U+2028, U+0085 and others, which JSON strings may hold.
    for line_no, line in enumerate(text.split("\n"), 1):
        line = line.removeprefix("\ufeff")  # a BOM: Windows editors start files with one (and `cat` joins them)
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


def _where(field: str, source: str, row: dict[str, Any], index: int) -> str:
    return f"data.{field}: {source}:{row.get('_line', index + 1)}"


def check_row(row: dict[str, Any], fmt: str, task: str, where: str) -> None:
    """Raise a DataError naming the row when it lacks a field, has one of the wrong type, or has nothing to learn."""
    needed = ("text", "label") if task == "sequence_classification" else REQUIRED[fmt]
    for key in needed:
        if key not in row:
            raise DataError(f"{where}: missing field '{key}' (format {fmt} needs {', '.join(needed)})")
    if task == "sequence_classification":
        _check_label_value(row["label"], where)
    elif fmt == "chat":
        _check_messages(row["messages"], where)
        return
    for key in needed:
        if key != "label" and not isinstance(row[key], str):
            raise DataError(f"{where}: '{key}' must be a string, got {type(row[key]).__name__}")
    # An empty target carries no loss but EOS (a classification text: the special tokens only): a slip in the data.
    target = "completion" if fmt == "prompt_completion" and task == "causal_lm" else "text"
    if not row[target].strip():
        raise DataError(f"{where}: the {target} is empty: fill or remove the row")


def _check_messages(msgs: Any, where: str) -> None:
    ok = isinstance(msgs, list) and msgs and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in msgs)
    if not ok or msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: 'messages' must be a list of {{role, content}} ending with an assistant turn")
    for i, m in enumerate(msgs):
        text = m["content"]
        empty = text is None or (isinstance(text, str) and not text.strip())
        if m["role"] == "assistant" and empty and not m.get("tool_calls"):  # a tool call is what such a turn says
            raise DataError(f"{where}: the assistant turn messages[{i}] is empty: fill or remove the row")


def _check_label_value(label: Any, where: str) -> None:
    """A class label is a class id (an integer from 0) or a class name (a string)."""
    if isinstance(label, str):
        if not label:
            raise DataError(f"{where}: 'label' is empty: give the class name or id")
        return
    if not isinstance(label, int) or isinstance(label, bool):
        raise DataError(f"{where}: 'label' must be a class id (integer from 0) or name (string), got {label!r}")
    if label == IGNORE:
        raise DataError(f"{where}: label {IGNORE} is not a class (every row needs its class): fix or remove the row")
    if label < 0:
        raise DataError(f"{where}: label {label} is negative: class ids start at 0")


def run_labels(cfg: RunConfig) -> Labels | None:
    """The classes of a classification run (None for causal_lm), as train, validate and eval read them."""
    if cfg.task != "sequence_classification":
        return None
    from tether.models import checkpoint_classes

    return label_space(cfg.data, cfg.model.num_labels, checkpoint_classes(cfg.model))


def label_space(cfg: DataConfig, num_labels: int | None, named: tuple[str, ...] | None = None) -> Labels:
    """The classes of the train and validation data: named when labels are strings (in the order of `named`, the
    classes a pre-trained classifier already has, when the data's names are among them, so that its head keeps its
    meaning; else sorted), else numbered 0..max; checked against model.num_labels when it is set. Every bad label is
    a DataError naming file:line."""
    found: dict[type, list[tuple[Any, str]]] = {int: [], str: []}
    for name in ("train", "validation"):
        source = getattr(cfg, name)
        if source is None:
            continue
        for i, row in enumerate(read_rows(source, name)):
            where = _where(name, source, row, i)
            check_row(row, "text", "sequence_classification", where)
            kind = str if isinstance(row["label"], str) else int
            if found[str if kind is int else int]:  # the first row of the other kind
                raise DataError(f"{where}: label {row['label']!r}: the data mixes class names and ids: use one kind")
            found[kind].append((row["label"], where))
    if found[str]:
        names = tuple(sorted({label for label, _ in found[str]}))
        if named is not None and set(names) <= set(named) and num_labels in (None, len(named)):
            return Labels(len(named), named)
        if num_labels is not None and num_labels != len(names):
            raise DataError(
                f"data.train: the data names {len(names)} classes ({', '.join(names)}) but model.num_labels is "
                f"{num_labels}: remove model.num_labels or fix the data"
            )
        return _at_least_two(Labels(len(names), names))
    if num_labels is not None:
        labels = Labels(num_labels)
        for label, where in found[int]:
            labels.id_of(label, where)
        return labels
    return _at_least_two(Labels(1 + max(label for label, _ in found[int])))


def _at_least_two(labels: Labels) -> Labels:
    if labels.num_labels < 2:
        raise DataError("data.train: the data has a single class: add rows of other classes or set model.num_labels")
    return labels


def encode(
    row: dict[str, Any], fmt: str, task: str, tokenizer: Any, max_length: int, *, overlap: int = 0,
    chat_loss: str = "all",
) -> list[dict[str, Any]]:  # fmt: skip
    """The examples of one checked row (a class label already an id: load_split maps names): windows for a long text
    row, else one example cut at max_length; none when cutting leaves no position with a loss."""
    if task == "sequence_classification":
        ids = _ids(tokenizer, row["text"], special=True)[:max_length]
        return [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": row["label"]}]
    ids, targets = _tokens(row, fmt, tokenizer, chat_loss)
    if fmt == "text":
        return windows(ids, targets, max_length, overlap)
    ids, targets = ids[:max_length], targets[:max_length]
    if all(label == IGNORE for label in targets[1:]):  # labels[0] is never predicted
        return []
    return [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": targets}]


def _tokens(row: dict[str, Any], fmt: str, tokenizer: Any, chat_loss: str) -> tuple[list[int], list[int]]:
    """The whole row's token ids and labels (-100 where no loss), with the end-of-text token."""
    eos = [tokenizer.eos_token_id]
    if fmt == "text":
        ids = _ids(tokenizer, row["text"], special=True) + eos
        return ids, list(ids)
    if fmt == "prompt_completion":
        # The prompt is tokenized as generation will see it (the tokenizer adds BOS if it does so by itself).
        prompt, target = _ids(tokenizer, row["prompt"], special=True), _ids(tokenizer, row["completion"]) + eos
        return prompt + target, [IGNORE] * len(prompt) + target
    return _chat_tokens(tokenizer, row["messages"], chat_loss)


def _ids(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    """Token ids of a text; special: with the tokens the tokenizer adds by itself (BOS). Not verbose: a text longer
    than the model's maximum is windowed or cut here, and counted, so transformers' warning would mislead."""
    return tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"]


def _chat_tokens(tokenizer: Any, messages: list[dict[str, str]], chat_loss: str) -> tuple[list[int], list[int]]:
    """The conversation through the tokenizer's chat template, the loss on every assistant turn (chat_loss all) or
    the last one. A turn's span is what rendering it adds after the generation prompt of the turns before it, so
    its closing tokens (<|im_end|>, <|eot_id|>) carry loss and the header the prompt ends with does not. Pieces
    are tokenized in order, as generation sees them (the prompt, then the answer's tokens)."""
    full = _render(tokenizer, messages, False)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    cuts = []  # (start, end) of each assistant span with loss, as character offsets in `full`
    for i in turns[-1:] if chat_loss == "last" else turns:
        prompt, turn = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[: i + 1], False)
        if not (full.startswith(turn) and turn.startswith(prompt)):
            raise DataError(
                "the tokenizer's chat template does not extend the prompt with the answer: use format text"
            )
        cuts.append((len(prompt), len(turn)))
    ids, labels, at = [], [], 0
    for start, end in cuts:
        context, answer = _ids(tokenizer, full[at:start]), _ids(tokenizer, full[start:end])
        ids += context + answer
        labels += [IGNORE] * len(context) + answer
        at = end
    rest = _ids(tokenizer, full[at:])
    ids, labels = ids + rest, labels + [IGNORE] * len(rest)
    if tokenizer.eos_token not in full[cuts[-1][0] :]:  # a template that does not close the turn with eos
        ids, labels = [*ids, tokenizer.eos_token_id], [*labels, tokenizer.eos_token_id]
    return ids, labels


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def load_split(
    source: str, field: str, fmt: str, task: str, tokenizer: Any, max_length: int, *, overlap: int = 0,
    chat_loss: str = "all", labels: Labels | None = None,
) -> Split:  # fmt: skip
    """Read, check and encode one data source, counting what was split into windows, cut or dropped."""
    rows = read_rows(source, field)
    kept, encoded, stats = [], [], SplitStats(rows=len(rows))
    for i, row in enumerate(rows):
        where = _where(field, source, row, i)
        check_row(row, fmt, task, where)
        classes = row
        if task == "sequence_classification":
            labels = labels or _labels_of_rows(rows)
            classes = {**row, "label": labels.id_of(row["label"], where)}
        examples = encode(classes, fmt, task, tokenizer, max_length, overlap=overlap, chat_loss=chat_loss)
        if _count(stats, examples, row, fmt, task, tokenizer, max_length, chat_loss):
            row["_cut"] = True  # counted again where the split is divided (split_off)
        kept += [row] * len(examples)
        encoded += examples
    if not encoded:
        raise DataError(f"data.{field}: no row keeps a target token within max_length={max_length}: raise it")
    return Split(kept, encoded, fmt, stats)


def _labels_of_rows(rows: list[dict[str, Any]]) -> Labels:
    """Labels of a split read without a label space (a test's, replay's): names sorted, or any id from 0."""
    names = sorted({row["label"] for row in rows if isinstance(row.get("label"), str)})
    return Labels(len(names), tuple(names)) if names else Labels(2**31)


def _count(stats: SplitStats, examples: list[dict], row: dict, fmt: str, task: str, tokenizer: Any,
           max_length: int, chat_loss: str) -> bool:  # fmt: skip
    """Add a row's examples to the counts; whether the row was cut at max_length."""
    stats.examples += len(examples)
    stats.tokens += sum(len(e["input_ids"]) for e in examples)
    stats.dropped += not examples
    stats.split += len(examples) > 1
    cut = len(examples) == 1 and len(examples[0]["input_ids"]) == max_length
    cut = cut and (fmt != "text" or task == "sequence_classification")
    cut = cut and _full_length(row, fmt, task, tokenizer, chat_loss) > max_length
    stats.truncated += cut
    return cut


def _full_length(row: dict, fmt: str, task: str, tokenizer: Any, chat_loss: str) -> int:
    if task == "sequence_classification":
        return len(_ids(tokenizer, row["text"], special=True))
    return len(_tokens(row, fmt, tokenizer, chat_loss)[0])


def load_datasets(cfg: DataConfig, task: str, tokenizer: Any, labels: Labels | None = None) -> Datasets:
    """Train, validation (a file or a seeded split of train) and optional reference data, encoded."""
    kw = {"overlap": cfg.window_overlap, "chat_loss": cfg.chat_loss, "labels": labels}
    train = load_split(cfg.train, "train", cfg.format, task, tokenizer, cfg.max_length, **kw)
    if cfg.validation is not None:
        validation = load_split(cfg.validation, "validation", cfg.format, task, tokenizer, cfg.max_length, **kw)
    else:
        train, validation = split_off(train, cfg.validation_fraction, cfg.seed)
    reference = None
    if cfg.reference is not None:
        fmt = cfg.reference_format or cfg.format
        reference = load_split(cfg.reference, "reference", fmt, task, tokenizer, cfg.max_length, **kw)
    return Datasets(train, validation, reference, labels)


def split_off(
    split: Split,
    fraction: float,
    seed: int | str,
    too_few: str = "data.train has fewer than 2 usable rows: add rows or give data.validation",
) -> tuple[Split, Split]:
    """Seeded random split of rows into (kept, the `fraction` split off): train and validation, or the measured and
    the held-out reference rows (tether.roles); both keep at least one row. The windows of a row stay together (a
    window in each would leak the text between them). `too_few`: the error when there are fewer than 2 rows."""
    groups: list[list[int]] = []
    for i, row in enumerate(split.rows):
        if groups and split.rows[groups[-1][0]] is row:
            groups[-1].append(i)
        else:
            groups.append([i])
    if len(groups) < 2:
        raise DataError(too_few)
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(fraction * len(order))), len(order) - 1)
    val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])

    def take(idx: list[int], dropped: int) -> Split:
        members = [i for g in idx for i in groups[g]]
        part = Split([split.rows[i] for i in members], [split.encoded[i] for i in members], split.format)
        part.stats = SplitStats(
            rows=len(idx) + dropped, examples=len(members), tokens=sum(len(e["input_ids"]) for e in part.encoded),
            split=sum(len(groups[g]) > 1 for g in idx), truncated=sum("_cut" in split.rows[groups[g][0]] for g in idx),
            dropped=dropped,
        )  # fmt: skip
        return part

    return take(train_idx, split.stats.dropped), take(val_idx, 0)  # dropped rows came from the train file


def describe(name: str, split: Split, batch_size: int, packed: list[dict[str, Any]] | None = None) -> str:
    """One line of what a split holds: rows, tokens, windows and cut rows, and the padding its batches carry (or,
    packed, how full the packed examples are)."""
    s = split.stats
    parts = [f"{name}: {s.rows} rows", f"{s.tokens:,} tokens"]
    if s.split:
        parts.append(f"{s.split} long rows split into windows ({s.examples} examples)")
    if s.truncated:
        parts.append(f"{s.truncated} rows cut at max_length")
    if s.dropped:
        parts.append(f"{s.dropped} rows dropped (nothing to learn within max_length)")
    lengths = [len(e["input_ids"]) for e in split.encoded]
    if packed is None:
        parts.append(f"padding {padding_share(lengths, batch_size):.0%} of batch tokens")
    else:
        widths = [len(e["input_ids"]) for e in packed]  # replay's rows are packed in too
        fill = sum(widths) / (len(packed) * max(widths))
        pad = padding_share(widths, batch_size)
        parts.append(f"packed into {len(packed)} examples, {fill:.0%} full, padding {pad:.0%} of batch tokens")
    return ", ".join(parts)


def data_summary(data: Datasets, training: dict[str, Any], packed: list[dict[str, Any]] | None = None) -> list[str]:
    """One line per split (describe) at the batch sizes of the TrainingArguments `training`; `packed`: the packed
    training examples."""
    train, evaluation = training["per_device_train_batch_size"], training["per_device_eval_batch_size"]
    lines = [describe("train", data.train, train, packed), describe("validation", data.validation, evaluation)]
    if data.reference is not None:
        lines.append(describe("reference", data.reference, evaluation))
    return lines


def check_data(cfg: RunConfig) -> list[str]:
    """Read and check the data as `tether train` would (the tokenizer, every row, the class labels) and return the
    data summary: `tether validate` calls it, so that what train would refuse, validate refuses with the same line."""
    from tether.models import check_checkpoint, load_tokenizer

    check_checkpoint(cfg)
    tokenizer = load_tokenizer(cfg.model, cfg.task)
    labels = run_labels(cfg)
    data = load_datasets(cfg.data, cfg.task, tokenizer, labels)
    packed = pack(data.train.encoded, cfg.data.max_length) if cfg.data.packing else None
    return data_summary(data, cfg.training_arguments(), packed)


@dataclass
class Collator:
    """Right-pads input_ids (pad id), attention_mask (0) and token labels (-100); class labels become a tensor.
    Packed examples (with position_ids) get no attention_mask: their padding is one more row, with its own
    position_ids from 0. With `flatten` a packed batch becomes one row (what flash attention reads)."""

    pad_token_id: int
    flatten: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if "position_ids" in features[0]:
            return self._packed(features)
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

    def _packed(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.flatten:
            features = [{k: [v for f in features for v in f[k]] for k in ("input_ids", "labels", "position_ids")}]
        width = max(len(f["input_ids"]) for f in features)
        rows = [
            (
                _pad(f["input_ids"], width, self.pad_token_id),
                _pad(f["labels"], width, IGNORE),
                f["position_ids"] + list(range(width - len(f["position_ids"]))),
            )
            for f in features
        ]
        ids, labels, positions = (torch.tensor(list(column)) for column in zip(*rows))
        return {"input_ids": ids, "labels": labels, "position_ids": positions}


def _pad(values: list[int], width: int, fill: int) -> list[int]:
    return values + [fill] * (width - len(values))


def batches_of(
    encoded: list[dict[str, Any]], collator: Collator, batch_size: int, device: Any
) -> Callable[..., Iterator[dict[str, torch.Tensor]]]:
    """batches(shard=True) yielding the rows collated in batches on the device, as SetupContext.reference_batches
    wants them. With several processes, process r of W gets batches r, r + W, ...: the single-process batches,
    shared; shard=False gives every process all of them."""

    def batches(shard: bool = True) -> Iterator[dict[str, torch.Tensor]]:
        first, step = (rank(), world_size()) if shard else (0, 1)
        for start in range(first * batch_size, len(encoded), step * batch_size):
            yield {k: v.to(device) for k, v in collator(encoded[start : start + batch_size]).items()}

    return batches
