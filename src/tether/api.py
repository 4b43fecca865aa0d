"""tether inside an existing training script: regularize a transformers or TRL trainer, measure forgetting.

    trainer = SFTTrainer(model=model, args=args, train_dataset=train, peft_config=lora)   # the user's own
    trainer = tether.regularize(trainer, [{"name": "l2_sp", "strength": 0.01}, {"name": "replay"}], reference=facts)
    trainer.train()
    tether.forgetting(trainer.model, tokenizer, facts)       # LoRA: against the same model with adapters disabled

`regularize` installs the stack into the trainer it is given (its class becomes a subclass with RegularizedMixin)
after the trainer has wrapped its model (PEFT), so the regularizers are set up on the model that trains; the
trainer then refuses to train when something would make a regularizer do nothing (see RegularizedMixin).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from torch import nn

from tether.data import REQUIRED, Collator, Split, batches_of, check_row, encode, read_rows
from tether.errors import ConfigError, TetherError
from tether.evaluate import forgetting as forgetting_of
from tether.evaluate import reference_metrics
from tether.models import position_limit
from tether.reference import is_peft
from tether.regularizers import FinishContext, RegularizerConfig, RegularizerStack, SetupContext, parse_entries
from tether.roles import DEFAULT_HOLDOUT, counted, distinct, split_record, split_reference
from tether.section import RegularizerEntry
from tether.trainer import RegularizedMixin, StepEnd, check_trainer, row_mixers, set_up_by_hand

Reference = str | Path | list[dict[str, Any]] | Any  # a JSONL file, rows, or a datasets.Dataset
Rows = list[dict[str, Any]]
MAX_LENGTH = 1024  # tokens per reference row when the trainer's arguments name no max_length
MEASURERS = frozenset({"ema", "wise_ft", "merge"})  # finish() measures their models' forgetting on the reference
TOO_FEW = (
    "reference has fewer than 2 rows: it cannot be split between the regularizers that read it and finish()'s "
    "measurement: add rows, or pass measure=<the rows to measure>"
)
log = logging.getLogger(__name__)


def regularize(
    trainer: Any,
    regularizers: list[dict[str, Any] | RegularizerConfig],
    reference: Reference | None = None,
    *,
    measure: Reference | None = None,
    max_length: int | None = None,
    skip_non_finite: int = 0,
) -> Any:
    """Install tether's regularizers into `trainer` (transformers.Trainer, TRL's SFTTrainer, DPOTrainer,
    GRPOTrainer, ...) and return it, ready to train().

    regularizers: entries as in the YAML config ({"name": "l2_sp", "strength": 0.01}) or config objects.
    reference: what the model must not forget (the Fisher of ewc, replay's rows, kl / distill's reference is the
    model itself): a JSONL path, a list of rows or a datasets.Dataset, with `text`, `prompt`/`completion` or
    `messages` (or already tokenized: `input_ids`, optional `labels`). A nonzero TrainingArguments.weight_decay
    becomes the weight_decay regularizer (biases and norms excluded, as transformers does).
    measure: the rows tether.finish measures the forgetting of ema's, wise_ft's and merge's models on (same forms).
    Left out while a regularizer reads the reference rows (replay, ewc, si, self_replay's reference prompts), the
    reference is split as `tether train` splits data.reference: half its rows (seeded by args.seed, a row's windows
    together) go to those regularizers, the rest is measured, so rows trained on do not flatter the measurement or
    wise_ft's / merge's choice by it. Given, every reference row goes to the regularizers. finish() returns what
    went where as `reference_roles`.
    The regularizers are set up now, on trainer.model as the trainer wraps it (under FSDP when it has sharded it):
    call this after building the trainer, and wrap no adapter around its model afterwards (refused at train())."""
    if isinstance(trainer, RegularizedMixin) and type(trainer).made_by_regularize:
        raise TetherError("this trainer is regularized already: call tether.regularize once, with every regularizer")
    if isinstance(trainer, RegularizedMixin):  # RegularizedTrainer, or a class that mixes it in by hand
        raise TetherError(
            set_up_by_hand(type(trainer), "mixes in RegularizedMixin, which tether.regularize adds itself")
        )
    given_optimizer = trainer.optimizer is not None  # Trainer(optimizers=(opt, None)): args.weight_decay unused
    configs = _configs(regularizers, 0.0 if given_optimizer else trainer.args.weight_decay)
    readers = [c.name for c in configs if c.without_reference_data() is not None]
    measuring = bool(MEASURERS & {c.name for c in configs})
    tokenizer = trainer.processing_class
    rows, measure_rows = _rows(reference), _rows(measure)
    _check_token_head(trainer.model, readers, measuring, rows is not None or measure_rows is not None)
    _check_reference(readers, measuring, rows, measure_rows, tokenizer)
    length = _fitting(trainer.model, max_length or getattr(trainer.args, "max_length", None) or MAX_LENGTH)
    ref, measured = _split(rows, tokenizer, length), _split(measure_rows, tokenizer, length)
    roles = _roles(readers, measuring, ref, measured, trainer.args.seed)
    stack = RegularizerStack.from_configs(configs, skip_non_finite)
    cls = type(trainer)
    attrs = {"__module__": cls.__module__, "made_by_regularize": True}
    regularized = type(f"Regularized{cls.__name__}", (RegularizedMixin, cls), attrs)
    check_trainer(regularized, stack)
    if row_mixers(stack):  # replay: the regularizers' reference rows mixed in, in the training rows' form;
        given = roles.given  # self_replay generates from them with the model as it is
        mixed = None if given is None else _replayed(trainer, distinct(given.rows), given.encoded)
        before = SetupContext(trainer.model, None, trainer.args.learning_rate)
        trainer.train_dataset = stack.train_data(trainer.train_dataset, mixed, trainer.args.seed, ctx=before)
    trainer.__class__ = regularized
    _install(trainer, stack, roles)
    trainer.check_regularized()  # what is known now is refused now, not at train()
    return trainer


def _check_token_head(model: nn.Module, readers: list[str], measuring: bool, rows_given: bool) -> None:
    """The reference rows are read (ewc's Fisher, si's importance, replay) and measured (finish's forgetting) by their
    token loss: a model without a language-model head (a reward or classification model: one score per row) has
    none. ewc with fisher_path (not online) reads no rows and stays."""
    if model.get_output_embeddings() is not None:
        return
    if readers:
        raise ConfigError(
            f"{', '.join(readers)} {'reads' if len(readers) == 1 else 'read'} the reference rows by their token "
            "loss, which this model (no language-model head: one score per row, as RewardTrainer's) does not have: "
            "use l2_sp, l1 or l2 instead"
        )
    if measuring and rows_given:
        raise ConfigError(
            "finish() measures forgetting by the reference rows' token loss, which this model (no language-model "
            "head: one score per row, as RewardTrainer's) does not have: leave reference and measure out"
        )


def _check_reference(
    readers: list[str], measuring: bool, rows: Rows | None, measure_rows: Rows | None, tokenizer: Any
) -> None:
    if rows is None and readers:
        raise ConfigError(f"{', '.join(readers)} need reference data: pass reference=<JSONL path, rows or Dataset>")
    if measure_rows is not None and not measuring:
        raise ConfigError(
            "measure= is what finish() measures ema's, wise_ft's and merge's models on: add one of them, or leave "
            "measure out"
        )
    if (rows is not None or measure_rows is not None) and tokenizer is None:
        raise ConfigError("tether encodes the reference with the trainer's tokenizer: pass processing_class=tokenizer")


@dataclasses.dataclass(frozen=True)
class _Roles:
    given: Split | None  # what the regularizers read
    measured: Split | None  # what finish() measures forgetting on
    record: dict[str, Any] | None  # finish()'s reference_roles, as metrics.json's of `tether train`


def _roles(readers: list[str], measuring: bool, reference: Split | None, measure: Split | None, seed: int) -> _Roles:
    """Who reads which rows (see regularize's `measure`); one log line when readers and measurement share them."""
    if reference is None and measure is None:
        return _Roles(None, None, None)
    share = DEFAULT_HOLDOUT if readers and measuring and measure is None else None
    given, measured = reference, measure if measure is not None else reference
    if share is not None:
        measured, given = split_reference(reference, share, seed, TOO_FEW)
    what = "the held-out rows" if share else "every row"
    record = split_record(measured, given if share else None, given if readers else None, share, seed)
    record["readers"] = {name: f"{what} of reference ({counted(given)})" for name in readers}
    record["trained_on_measured"] = bool(measuring) and record["measured_examples_read"] > 0
    if not measuring:  # nothing is measured: finish() has no model of ema / wise_ft / merge to measure
        record.update(measured_rows=0, measured_examples=0, measured_examples_read=0)
    if readers and measuring:
        _say(", ".join(readers), len(given.encoded), len(measured.encoded), share, seed)
    return _Roles(given, measured, record)


def _say(readers: str, read: int, measured: int, share: float | None, seed: int) -> None:
    if share:
        log.info("reference: %d rows held out for %s (share %s, seed %d), the other %d measured by finish(); "
                 "measure= names the rows to measure", read, readers, share, seed, measured)  # fmt: skip
    else:
        log.info("reference: all %d rows to %s; finish() measures the %d rows of measure=", read, readers, measured)


def _split(rows: Rows | None, tokenizer: Any, max_length: int) -> Split | None:
    """The rows and their examples, a windowed row repeated once per window (as a data.Split holds them); prompt/
    completion rows are a fact set, whose greedy recall is measured too."""
    if rows is None:
        return None
    pairs = [(row, example) for row in rows for example in encode_rows([row], tokenizer, max_length)]
    facts = all({"prompt", "completion"} <= row.keys() for row in rows)
    examples = [example for _, example in pairs]
    return Split([row for row, _ in pairs], examples, "prompt_completion" if facts else "text")


def _install(trainer: Any, stack: RegularizerStack, roles: _Roles) -> None:
    """The stack on the (regularized) trainer, set up on its model: now, or under FSDP once it is sharded."""
    trainer.stack = stack
    trainer.reference_measured = roles.measured
    trainer.reference_roles = roles.record
    tokenizer = trainer.processing_class
    given = roles.given
    refs = None if given is None else batches_of(given.encoded, collator(tokenizer), 8, trainer.args.device)
    ctx = SetupContext(trainer.model, refs, trainer.args.learning_rate)
    if trainer.is_fsdp_enabled:  # FSDP shards the model inside train(): set up on the shards there
        trainer.pending_setup = lambda: stack.setup(dataclasses.replace(ctx, model=trainer.model))
    else:
        stack.setup(ctx)
    if roles.measured is not None and MEASURERS & set(stack.names):  # their final models are measured too
        trainer.reference_before = reference_metrics(trainer.model, tokenizer, roles.measured, collator(tokenizer))
    trainer.add_callback(StepEnd(stack))


def collator(tokenizer: Any) -> Collator:
    """tether's padding collator; a tokenizer without a pad token pads with its end-of-text token."""
    pad = tokenizer.pad_token_id
    return Collator(tokenizer.eos_token_id if pad is None else pad)


def _configs(entries: list[dict[str, Any] | RegularizerConfig], weight_decay: float) -> list[RegularizerConfig]:
    """The entries validated as the YAML's are; TrainingArguments.weight_decay merged in as weight_decay."""
    dicts = [e.model_dump() if isinstance(e, RegularizerConfig) else e for e in entries]  # checked alike, in order
    configs = parse_entries([RegularizerEntry(**e) for e in dicts])
    decay = next((c for c in configs if c.name == "weight_decay"), None)
    if weight_decay and decay is None:
        configs += parse_entries([RegularizerEntry(name="weight_decay", strength=weight_decay)])
    elif weight_decay and decay.strength != weight_decay:
        raise ConfigError(
            f"TrainingArguments.weight_decay={weight_decay} and the weight_decay regularizer's strength "
            f"{decay.strength} differ: keep one of them"
        )
    return configs


def _rows(reference: Reference | None) -> list[dict[str, Any]] | None:
    if reference is None:
        return None
    if isinstance(reference, str | Path):
        return read_rows(str(reference), "reference")
    rows = [dict(row) for row in reference]  # a list, or a datasets.Dataset (its rows are dicts)
    if not rows:
        raise ConfigError("reference has no rows: give rows to hold on to, or leave it out")
    return rows


def encode_rows(rows: list[dict[str, Any]], tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """Rows as tether trains and measures them: input_ids, attention_mask and labels (-100 where no loss). Rows
    already tokenized keep their ids; without labels every token carries loss."""
    encoded = []
    for row in rows:
        if "input_ids" in row:
            ids = list(row["input_ids"])[:max_length]
            labels = list(row.get("labels", ids))[:max_length]
            encoded.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
            continue
        fmt = next((f for f, keys in REQUIRED.items() if set(keys) <= row.keys()), None)
        if fmt is None:
            raise ConfigError(f"reference row {row!r:.80}: give text, prompt and completion, messages or input_ids")
        check_row(row, fmt, "causal_lm", f"reference row {row!r:.80}")  # as tether train checks its files' rows
        encoded += encode(row, fmt, "causal_lm", tokenizer, max_length)  # a row or its windows
    return encoded


def _replayed(trainer: Any, rows: list[dict[str, Any]], encoded: list[dict[str, Any]]) -> Any:
    """The reference rows in the form of the trainer's training rows: prepared as TRL's SFTTrainer prepares its
    own (its tokenization, chat template and masks), tokenized when the training rows are, else as given."""
    if any(c.__name__ == "SFTTrainer" for c in type(trainer).__mro__):
        from datasets import Dataset

        args = trainer.args
        prepare = trainer._prepare_dataset  # TRL's own preparation, so the replayed rows match the others
        return prepare(Dataset.from_list(rows), trainer.processing_class, args, args.packing, None, "replay")
    return encoded if "input_ids" in trainer.train_dataset[0] else rows


def knowledge(model: nn.Module, tokenizer: Any, rows: Reference, *, max_length: int = MAX_LENGTH) -> dict[str, float]:
    """What `model` knows of `rows`: their loss (token-weighted), and greedy exact-match recall of the completions
    for prompt/completion rows. Take it before training to measure forgetting after (see `forgetting`)."""
    split = _split(_rows(rows), tokenizer, _fitting(model, max_length))
    return reference_metrics(model, tokenizer, split, collator(tokenizer))


def _fitting(model: nn.Module, length: int) -> int:
    """`length` (TRL's max_length, or tether's default), cut to what a learned position table holds (GPT-2's
    n_positions, BERT's 512): longer reference rows would look up positions it lacks."""
    limit = position_limit(model)
    return length if limit is None else min(length, limit.positions)


def forgetting(
    model: nn.Module, tokenizer: Any, rows: Reference, before: dict[str, float] | nn.Module | None = None
) -> dict[str, float]:
    """How much of `rows` the model forgot: the forgetting.* of metrics.json (reference loss before and after and its
    increase; recall before, after and its drop for prompt/completion rows). `before`: the `knowledge` taken before
    training, or the original model; None under PEFT: the same model with its adapters disabled."""
    if before is None:
        if not is_peft(model):
            raise TetherError(
                "forgetting of a fully fine-tuned model needs before=: tether.knowledge(model, tokenizer, rows) "
                "taken before training, or the original model"
            )
        with model.disable_adapter():
            before = knowledge(model, tokenizer, rows)
    elif isinstance(before, nn.Module):
        before = knowledge(before, tokenizer, rows)
    return forgetting_of(before, knowledge(model, tokenizer, rows))


def finish(trainer: Any, output_dir: str | Path | None = None) -> dict[str, Any]:
    """After train(): what ema, wise_ft and merge do at the end of a run (their models measured on the trainer's eval
    data and the measured reference rows, and saved under output_dir/model_ema, model_wise_ft, model_merge);
    {name: results}, and `reference_roles` when regularize() was given rows: which reference rows were measured and
    which the regularizers read (as metrics.json's of `tether train`)."""
    if not isinstance(trainer, RegularizedMixin):
        raise TetherError("finish() takes a trainer that tether.regularize returned")
    out = Path(output_dir or trainer.args.output_dir)
    tokenizer = trainer.processing_class

    def evaluate(model: nn.Module) -> dict[str, Any]:
        if trainer.eval_dataset is None:
            raise TetherError("ema and wise_ft measure their models on the eval data: give the trainer eval_dataset")
        metrics: dict[str, Any] = {"target": {"val_loss": trainer.evaluate()["eval_loss"]}}
        if trainer.reference_before is not None:
            after = reference_metrics(model, tokenizer, trainer.reference_measured, collator(tokenizer))
            metrics["forgetting"] = forgetting_of(trainer.reference_before, after)
        return metrics

    def save(model: nn.Module, name: str) -> Path:
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
        return out / name

    results = trainer.stack.after_training(trainer.model, FinishContext(out, evaluate, save))
    roles = trainer.reference_roles
    return results if roles is None else results | {"reference_roles": roles}
