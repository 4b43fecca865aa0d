"""`tether train` and `tether eval` as functions: load, measure before, train with the stack, measure after, write."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn
from transformers import TrainerCallback, TrainerState
from transformers.trainer import TRAINER_STATE_NAME

from tether.card import run_card
from tether.config import RunConfig, dump_config, parse_yaml
from tether.data import (
    Collator,
    Datasets,
    Labels,
    Split,
    batches_of,
    data_summary,
    load_datasets,
    load_split,
    run_labels,
)
from tether.distributed import barrier, is_main_process, local
from tether.errors import ConfigError, Interrupted, NonFiniteError, TetherError, one_line
from tether.evaluate import (
    Progress,
    classification_metrics,
    dataset_metrics,
    forgetting,
    reference_metrics,
    start_pass,
)
from tether.models import apply_lora, apply_osf, check_max_length, check_positions, is_osf, load_model, merged_osf
from tether.outputs import (
    RUN_STATE,
    hold_run_dir,
    plot_curves,
    share,
    write_dir_atomic,
    write_json,
    write_jsonl,
    write_text_atomic,
)
from tether.packing import check_packing, pack
from tether.progress import pass_progress
from tether.regularizers import FinishContext, RegularizerStack, SetupContext, parse_entries
from tether.regularizers.ewc import RUN_FISHER
from tether.report.runs import write_report
from tether.report.tensorboard import write_final_scalars
from tether.roles import assign_roles
from tether.tracking import RunLog, budget_of, final_record, measure_base, start_tracking
from tether.trainer import STACK_STATE

log = logging.getLogger(__name__)
TRAIN_LOSS_ROWS = 2000  # the train-loss estimate of the overfitting gap uses at most this many rows


def training_args(cfg: RunConfig, output_dir: Path) -> Any:
    """TrainingArguments from the `training:` section; early stopping sets the best-model keys."""
    from transformers import TrainingArguments

    kw = cfg.training_arguments()
    kw["output_dir"] = str(output_dir)
    kw.setdefault("dataloader_pin_memory", torch.cuda.is_available())  # pinning without a GPU only warns
    if not torch.cuda.is_available():
        kw.setdefault("use_cpu", True)  # without it, processes started by torchrun on CPU would not form a DDP group
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            kw.setdefault("ddp_backend", "gloo")  # only with several processes: a backend alone starts a group
    if cfg.early_stopping is not None:  # with evaluations: validate_config refuses eval_strategy no
        budgeted = cfg.early_stopping.forgetting_budget is not None  # the choice on target and retention: tracking
        metric = "eval_choice" if budgeted else cfg.early_stopping.metric
        kw.update(load_best_model_at_end=True, metric_for_best_model=metric)
        kw.update(greater_is_better=cfg.early_stopping.mode == "max", save_strategy=kw["eval_strategy"])
        kw["save_steps"] = kw.get("eval_steps")  # the best model can only be restored from a saved step
    try:
        return TrainingArguments(**kw)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"training: {one_line(e)}: change the training section") from None


def check_output_dir(output_dir: Path, overwrite: bool, resume: bool) -> str | None:
    """Refuse to train over a finished run, or into a place that cannot be written; creates nothing. Returns the
    checkpoint to resume from: the last one when --resume is given or when an unfinished run left checkpoints."""
    if (output_dir / "metrics.json").exists() and not overwrite:
        raise TetherError(f"{output_dir} holds a finished run: pass --overwrite or choose another --output-dir")
    existing = next(p for p in (output_dir, *output_dir.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "a file is in the way")
        with tempfile.TemporaryFile(dir=existing):  # a real probe: os.access says yes to root on a read-only fs
            pass
    except OSError as e:
        reason = e.strerror
        raise TetherError(f"output dir {output_dir} is not writable ({reason}): choose another --output-dir") from None
    if not output_dir.is_dir():
        if resume:
            raise TetherError(f"--resume: {output_dir} does not exist: train without --resume")
        return None
    last = last_complete_checkpoint(output_dir)
    if resume and last is None:
        raise TetherError(f"--resume: {output_dir} holds no checkpoint-N directory: train without --resume")
    return None if overwrite and not resume else last


# TrainingArguments the checkpoint's optimizer and scheduler state override on resume (param-group lr and weight
# decay, Adam betas, the scheduler's base lr): a changed value would be ignored while config.yaml claimed it
RESTORED = {"learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "optim", "optim_args", "adam_beta1"}
RESTORED |= {"adam_beta2", "adam_epsilon"}


def record_config(cfg: RunConfig, output_dir: Path, resume_from: str | None, accept_changes: bool) -> None:
    """Keep the config a run started with in OUT/.tether/config.yaml; a resume with another one is refused,
    naming the changed keys, unless accept_changes (and then only keys that take effect when resumed)."""
    stored = output_dir / RUN_STATE / "config.yaml"
    if resume_from is not None and stored.is_file():
        changed = changed_keys(parse_yaml(stored.read_text()), cfg.model_dump(mode="json"))
        if changed and not accept_changes:
            raise TetherError(
                f"{output_dir} was started with another config (changed: {', '.join(changed)}): undo the changes, "
                "pass --accept-changes to continue with the new values, or --overwrite to start again"
            )
        fixed = [k for k in changed if _restored(k, cfg)]
        if fixed:
            raise TetherError(
                f"--accept-changes: {', '.join(fixed)} cannot change on resume (the checkpoint's optimizer state "
                "restores it): undo that change, or pass --overwrite to start again"
            )
    if is_main_process():
        write_text_atomic(stored, dump_config(cfg))


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config mappings (the output dir and the sweep do not count)."""
    if type(old) is type(new) and isinstance(old, dict | list):
        keys = sorted({*_keys(old), *_keys(new)}, key=str)
        paths = [(k, f"{prefix}{k}") for k in keys if f"{prefix}{k}" not in ("output_dir", "sweep")]
        return [c for k, path in paths for c in changed_keys(_get(old, k), _get(new, k), f"{path}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _keys(node: dict | list) -> list:
    return list(node) if isinstance(node, dict) else list(range(len(node)))


def _get(node: dict | list, key: Any) -> Any:
    return node.get(key) if isinstance(node, dict) else (node[key] if key < len(node) else None)


def _restored(key: str, cfg: RunConfig) -> bool:
    """Whether resuming restores this key's old value: an optimizer setting, or a regularizer that shapes the
    optimizer's parameter groups (weight decay, LLRD), whose values the optimizer state carries."""
    from tether.regularizers.base import REGISTRY, Regularizer

    section, _, rest = key.partition(".")
    if section == "training":
        return rest.split(".")[0] in RESTORED
    if section != "regularizers":
        return False
    index = int(rest.split(".")[0])
    if index >= len(cfg.regularizers):  # a removed entry: the optimizer's saved groups may no longer match
        return True
    return REGISTRY[cfg.regularizers[index].name].cls.param_groups is not Regularizer.param_groups


def clear_checkpoints(output_dir: Path) -> None:
    """--overwrite: a fresh run must not resume from, or rotate, the old run's checkpoints (its Fisher goes with
    every fresh start: prepare_output_dir)."""
    for old in output_dir.glob("checkpoint-*"):
        shutil.rmtree(old)
    (output_dir / "metrics.json").unlink(missing_ok=True)


def last_complete_checkpoint(output_dir: Path) -> str | None:
    """The newest checkpoint-N whose trainer_state.json (the Trainer writes it last) parses; newer, half-written
    ones (a kill during a save) are renamed aside by the main process so that nothing loads them and nothing is
    lost."""
    steps = sorted((int(p.name.split("-")[1]), p) for p in output_dir.glob("checkpoint-*") if p.name[11:].isdigit())
    for _, path in reversed(steps):
        try:
            json.loads((path / "trainer_state.json").read_text())
            check_checkpoint_files(path)
            return str(path)
        except (OSError, ValueError):
            if not is_main_process():
                continue
            aside = path.with_name(f".incomplete-{path.name}-{int(time.time())}")
            log.warning("%s is incomplete or damaged (killed during a save?): moved to %s", path, aside.name)
            os.replace(path, aside)
    return None


def check_checkpoint_files(checkpoint: Path) -> None:
    """Raises ValueError for a truncated or emptied file (a disk fault, a copy cut short): every safetensors file
    must be as long as its header says, every torch file (optimizer, scheduler, rng) a whole zip archive."""
    for path in checkpoint.glob("*.safetensors"):
        with path.open("rb") as f:
            size = min(int.from_bytes(f.read(8), "little"), path.stat().st_size)  # garbage may claim exabytes
            header = json.loads(f.read(size))  # ValueError when cut short or empty
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if path.stat().st_size != 8 + size + end:
            raise ValueError(f"{path.name} is truncated")
    for path in [*checkpoint.glob("*.pt"), *checkpoint.glob("*.pth")]:
        if not zipfile.is_zipfile(path):  # torch.save writes a zip; its directory is at the end
            raise ValueError(f"{path.name} is truncated")


def reference_batches(data: Datasets, collator: Collator, batch_size: int, device: torch.device) -> Any:
    """batches(shard=True) yielding the reference data as collated batches on the device (None without reference
    data). With several processes, process r of W gets batches r, r + W, ...: the single-process batches, shared."""
    return None if data.reference is None else batches_of(data.reference.encoded, collator, batch_size, device)


def holding_output_dir(run: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Wraps train: the run holds its output directory's lock from its first check to its last write (only the first
    process of a launch takes it: the others write nothing but their parts of each checkpoint)."""

    @functools.wraps(run)
    def locked(cfg: RunConfig, output_dir: Path, **kwargs: Any) -> dict[str, Any]:
        if os.environ.get("RANK", "0") != "0":  # read before the process group exists
            return run(cfg, output_dir, **kwargs)
        with hold_run_dir(output_dir):
            return run(cfg, output_dir, **kwargs)

    return locked


@holding_output_dir
def train(
    cfg: RunConfig,
    output_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    accept_changes: bool = False,
    callbacks: list | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Fine-tune as configured and write model/, config.yaml, history.jsonl, metrics.json and curves.png. With a
    console, the memory estimate and the progress of passes before training (the Fisher) are shown on it. With
    several processes only the main one writes, and the others return {}."""
    from transformers import set_seed

    run_started = time.perf_counter()
    check_max_length(cfg.model, cfg.task, cfg.data.max_length)  # before anything is written, as validate refuses it
    args = training_args(cfg, output_dir)
    resume_from = check_output_dir(output_dir, overwrite, resume)
    record_config(cfg, output_dir, resume_from, accept_changes)
    set_seed(args.seed)
    with nothing_left_on_error(output_dir):
        labels = run_labels(cfg)  # classification: the classes, from the data
        model, tokenizer, new_parameters = load_model(cfg.model, cfg.task, labels)
        model.to(args.device)
        data = load_datasets(cfg.data, cfg.task, tokenizer, labels)
        roles = assign_roles(cfg, data.reference)  # measured rows vs the rows replay / ewc / si may read
        data = replace(data, reference=roles.measured)
        prepare_output_dir(output_dir, clear=overwrite and not resume, fresh=resume_from is None)
        # flash attention finds packed rows in one flattened row only (transformers' _is_packed_sequence)
        collator = Collator(tokenizer.pad_token_id, flatten="flash" in str(model.config._attn_implementation))
        if cfg.data.packing:
            check_packing(model, collator)
        # only the main process measures and writes; tracking (early stopping) needs the base's numbers on every one
        main_measures = data.reference is not None and (is_main_process() or cfg.evaluation.track)
        with pass_progress(console) as progress:
            before = reference_metrics(model, tokenizer, data.reference, collator, progress) if main_measures else None
            base = measure_base(cfg, model, tokenizer, data, collator, progress) if is_main_process() else {}
        base.update(roles=roles.record, started=run_started)
        if cfg.lora is not None:
            model = apply_lora(model, cfg.lora, cfg.task, calibration_rows(cfg, roles.regularizers, data, args.device))
        if cfg.osf is not None:
            model = apply_osf(model, cfg.osf, cfg.task)
        stack = RegularizerStack.from_configs(parse_entries(cfg.regularizers), cfg.skip_non_finite, new_parameters)
        # the Trainer's eval_loss is smoothed under label_smoothing_factor: then no base loss to compare it with
        comparable = base.get("val_loss") if not args.label_smoothing_factor else None
        run_log = RunLog(output_dir / "history.jsonl" if is_main_process() else None, budget_of(cfg), comparable)
        for_regularizers = replace(data, reference=roles.regularizers)
        callbacks = [run_log, *(callbacks or [])]
        trainer = _trainer(cfg, model, tokenizer, args, for_regularizers, collator, stack, callbacks, console)
        show_data(cfg, data, trainer.train_dataset, console)
        refs = reference_batches(for_regularizers, collator, args.per_device_eval_batch_size, args.device)
        read = functools.partial(_read_batches, cfg, tokenizer, for_regularizers, collator, args)
        ctx = SetupContext(trainer.model, refs, args.learning_rate, output_dir=output_dir, read_batches=read)
        if trainer.is_fsdp_enabled:  # FSDP shards the model inside trainer.train: set up on the shards there
            trainer.pending_setup = lambda: setup_stack(stack, replace(ctx, model=trainer.model), console)
        else:
            setup_stack(stack, ctx, console)
        start_tracking(run_log, cfg, trainer, tokenizer, collator, data, before)
    started = time.perf_counter()
    _fit(trainer, resume_from, output_dir)
    runtime = time.perf_counter() - started
    try:
        model = gathered_model(cfg, trainer) if trainer.is_fsdp_enabled else trainer.model
        if not is_main_process():
            return {}
        with pass_progress(console) as progress:
            return _finish(cfg, output_dir, trainer, model, tokenizer, data, collator, before, runtime, progress, base)
    finally:
        barrier()  # every process returns once the run is measured and written (and none exits under the others)


def show_data(cfg: RunConfig, data: Datasets, train_rows: list, console: Console | None) -> None:
    """What the data holds before training: rows, tokens, windows and cut rows, padding (or the packed fill)."""
    for line in data_summary(data, cfg.training_arguments(), train_rows if cfg.data.packing else None):
        if console is not None and is_main_process():
            console.print(f"data {line}", highlight=False, soft_wrap=True)
        else:
            log.info("data %s", line)


def calibration_rows(cfg: RunConfig, held: Split | None, data: Datasets, device: Any) -> Iterator[dict] | None:
    """lora.init corda_*: the rows CorDA calibrates on, one per batch: for corda_kpm the reference rows held out of
    the measurement (tether.roles), for corda_ipm the training rows; None for a default init."""
    if cfg.lora is None or cfg.lora.init == "default":
        return None
    split = held if cfg.lora.init == "corda_kpm" else data.train
    rows = [] if split is None else split.encoded
    return ({"input_ids": torch.tensor([row["input_ids"]], device=device)} for row in rows)


def setup_stack(stack: RegularizerStack, ctx: SetupContext, console: Console | None) -> None:
    """The regularizers' setup (anchors, Fisher, reference) with its progress, then the memory estimate."""
    with pass_progress(console) as progress:
        stack.setup(replace(ctx, progress=progress))
    show_memory(memory_estimate(ctx.model, stack), console)


def gathered_model(cfg: RunConfig, trainer: Any) -> nn.Module | None:
    """FSDP: the trained weights gathered whole into a fresh unsharded model on the main process (None on the
    others; every process takes part in the gathering), so that measuring and saving run there as without FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(trainer.model, options=options)
    if not is_main_process():
        return None
    labels = Labels.of_model(trainer.model.config) if cfg.task == "sequence_classification" else None
    model = load_model(cfg.model, cfg.task, labels).model
    if cfg.lora is not None:  # the adapters' start does not matter: the trained state replaces every tensor
        model = apply_lora(model, cfg.lora.model_copy(update={"init": "default"}), cfg.task)
    model.load_state_dict(state)
    return model.to(trainer.args.device)


@contextmanager
def nothing_left_on_error(output_dir: Path) -> Iterator[None]:
    """A run rejected before training (a config contradiction found at setup) leaves no directory it created."""
    created = not output_dir.exists() or {p.name for p in output_dir.iterdir()} <= {RUN_STATE}  # or just the lock
    try:
        yield
    except TetherError:
        if created and is_main_process():
            shutil.rmtree(output_dir, ignore_errors=True)
        raise


def prepare_output_dir(output_dir: Path, clear: bool, fresh: bool) -> None:
    """The main process clears what --overwrite replaces and, for a fresh start, the Fisher an unfinished attempt
    left (a fresh run estimates its own); the others wait for it."""
    if is_main_process():
        if clear:
            clear_checkpoints(output_dir)
        if fresh:
            (output_dir / RUN_FISHER).unlink(missing_ok=True)
    barrier()


def _fit(trainer: Any, resume_from: str | None, output_dir: Path) -> None:
    """trainer.train, resumed with the regularizers' saved state (RegularizedMixin.train loads it); a non-finite
    loss names the step and checkpoint."""
    if resume_from is not None:
        log.warning("resuming from %s", resume_from)
        if training_ended(Path(resume_from), trainer.args):
            restore_end(trainer, resume_from)
            return
    trainer.add_callback(SharedCheckpoints())
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except NonFiniteError as e:
        last = last_complete_checkpoint(output_dir)
        kept = f"last good checkpoint: {last}" if last else "no checkpoint was written yet"
        step = trainer.state.global_step + 1 if e.step is None else e.step
        raise NonFiniteError(f"step {step}: {e} ({kept})") from None
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM as the CLI turns it into one
        last = last_complete_checkpoint(output_dir)
        kept = f"last checkpoint: {last}" if last else "no checkpoint was written yet"
        step, steps = trainer.state.global_step, trainer.state.max_steps
        raise Interrupted(f"stopped at step {step} of {steps} ({kept})", last) from None


def training_ended(checkpoint: Path, args: Any) -> bool:
    """Whether the checkpoint was saved as training ended (its last step, or early stopping's stop): a run killed
    after it (final evaluation, EMA, WiSE-FT) only has its measurements left to do. The Trainer saves the control
    it stopped with; a max_steps raised since (--accept-changes) means more steps to train."""
    state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME))
    control = state.stateful_callbacks.get("TrainerControl", {})
    if not control.get("args", {}).get("should_training_stop"):
        return False
    stopped_early = state.global_step < state.max_steps
    return stopped_early or args.max_steps <= 0 or args.max_steps <= state.global_step


def restore_end(trainer: Any, checkpoint: str) -> None:
    """The trainer as trainer.train() leaves it, from the checkpoint saved at the end of training, without another
    step: its state (log history, best step), its weights, then the best ones when early stopping restores them."""
    log.warning("training had ended at %s: finishing the measurements without another step", checkpoint)
    if trainer.pending_setup is not None:  # FSDP's deferred setup: WiSE-FT and the measurements need the anchors
        setup, trainer.pending_setup = trainer.pending_setup, None
        setup()
    trainer.stack.load_state_dict(load_stack_state(Path(checkpoint)))
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE_NAME))
    trainer._load_from_checkpoint(checkpoint)  # the Trainer's own loader (full weights or adapters)
    if trainer.args.load_best_model_at_end and trainer.state.best_model_checkpoint is not None:
        trainer._load_best_model()


class SharedCheckpoints(TrainerCallback):
    """Each checkpoint gets the umask's file modes, as every other output (the weights' writer makes them 0600)."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            share(checkpoint)


def load_stack_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The regularizers' state saved with a checkpoint ({} for a checkpoint written without regularizer state)."""
    from safetensors.torch import load_file

    path = checkpoint / STACK_STATE
    return load_file(str(path)) if path.is_file() else {}


def memory_estimate(model: nn.Module, stack: RegularizerStack) -> dict[str, int]:
    """Bytes the run holds before activations: weights, gradients and Adam-style optimizer state (two fp32 moments)
    of the trainable ones, and what the regularizers and the frozen reference hold."""
    params = {id(p): local(p) for p in model.parameters()}.values()  # this process's shards under FSDP
    trainable = [p for p in params if p.requires_grad]
    est = {
        "model weights": sum(p.numel() * p.element_size() for p in params),
        "gradients": sum(p.numel() * p.element_size() for p in trainable),
        "optimizer state (Adam moments)": sum(2 * 4 * p.numel() for p in trainable),
    }
    return {**est, **stack.memory()}


def show_memory(estimate: dict[str, int], console: Console | None) -> None:
    lines = [f"{what}: {n / 2**20:.1f} MiB" for what, n in estimate.items()]
    text = f"memory estimate (before activations): {sum(estimate.values()) / 2**20:.1f} MiB = " + ", ".join(lines)
    if console is not None and is_main_process():
        console.print(text, highlight=False)
    else:
        log.info(text)


def _trainer(cfg: RunConfig, model: nn.Module, tokenizer: Any, args: Any, data: Datasets, collator: Collator,
             stack: RegularizerStack, callbacks: list, console: Console | None = None) -> Any:  # fmt: skip
    """The RegularizedTrainer over the training rows after the stack's train_data (replay) and early stopping."""
    from transformers import EarlyStoppingCallback, PrinterCallback

    from tether.trainer import RegularizedTrainer

    if cfg.early_stopping is not None:
        callbacks.append(EarlyStoppingCallback(cfg.early_stopping.patience, cfg.early_stopping.threshold))
    reference_rows = data.reference.encoded if data.reference else None
    with pass_progress(console) as progress:  # the model before setup: self_replay generates rows with it
        ctx = SetupContext(model, output_dir=Path(args.output_dir), progress=progress)
        read = _reader(cfg, tokenizer, data.labels)
        train_rows = stack.train_data(data.train.encoded, reference_rows, args.seed, read, ctx)
    if cfg.data.packing:  # the training rows only: evaluation runs unpacked, so its numbers do not depend on it
        train_rows = pack(train_rows, cfg.data.max_length)
    data = replace(data, train=replace(data.train, encoded=train_rows))  # the Trainer's; metrics use the original
    metrics = classification_metrics if cfg.task == "sequence_classification" else None  # eval_accuracy, eval_f1
    try:
        trainer = RegularizedTrainer(
            model=model, args=args, train_dataset=data.train.encoded, eval_dataset=data.validation.encoded,
            data_collator=collator, stack=stack, callbacks=callbacks, compute_metrics=metrics,
        )  # fmt: skip
    except ValueError as e:  # the Trainer checks the arguments against the launch (e.g. fsdp needs processes)
        raise ConfigError(f"training: {one_line(e)}: change the training section") from None
    trainer.remove_callback(PrinterCallback)  # history.jsonl and the progress bar carry the logs
    version = getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", 1) if trainer.is_fsdp_enabled else None
    check_sharding(cfg, stack, version, trainer.is_deepspeed_enabled)
    return trainer


def check_sharding(cfg: RunConfig, stack: RegularizerStack, fsdp_version: int | None, deepspeed: bool) -> None:
    """What cannot run on FSDP (fsdp_version given) or DeepSpeed: train asks it of the trainer's launch, validate of
    the training section (training.fsdp / training.deepspeed)."""
    if deepspeed:
        check_deepspeed(stack)
        if cfg.evaluation.track and budget_of(cfg) is not None:
            raise ConfigError(
                "early_stopping.forgetting_budget: forgetting is not tracked during training under DeepSpeed: "
                "train with FSDP2 or DDP, or drop the budget"
            )
    if fsdp_version is None:
        return
    lm_eval = cfg.evaluation.lm_eval
    # lm-eval's generation does not keep the processes stepping together (synced_gpus), and each forward on shards
    # is collective: one process done early would leave the others waiting
    if cfg.evaluation.track and lm_eval is not None and lm_eval.at_evaluations:
        raise ConfigError(
            "evaluation.lm_eval.at_evaluations does not run on FSDP's shards: set it to false (the scores after "
            "training are still taken, on the gathered model)"
        )
    if cfg.osf is not None:  # a silent no-op otherwise: tests/test_osf.py shows the hooks lost under fully_shard
        raise ConfigError(
            "osf: FSDP2 replaces each parameter by its shards, and with them the gradient hooks by which PEFT's "
            "OSF keeps the updates off the frozen directions: train osf without FSDP, or use lora"
        )
    check_fsdp(stack, fsdp_version, cfg.lora is not None)


def check_deepspeed(stack: RegularizerStack) -> None:
    """DeepSpeed ZeRO keeps parameters and gradients in its own flattened partitions: refuse what works on them."""
    direct = [reg.name for reg, _ in stack.items if reg.touches_parameters]
    if direct:
        raise ConfigError(
            f"{', '.join(direct)} work on the parameters and gradients, which DeepSpeed ZeRO partitions out of "
            "reach: train with FSDP2 (configs/accelerate/fsdp.yaml) or DDP, or drop them"
        )


def check_fsdp(stack: RegularizerStack, fsdp_version: int, lora: bool) -> None:
    """What tether runs on FSDP: version 2 (DTensor shards, which the regularizers work on), no whole-model state,
    and a reference that is the sharded model itself (LoRA with the adapters off), not a whole frozen copy."""
    if fsdp_version != 2:
        raise ConfigError("training.fsdp_config: tether needs FSDP2: set version: 2 (fsdp_version: 2 for accelerate)")
    stack.check_shardable()
    referenced = [reg.name for reg, _ in stack.items if reg.reference_options() is not None]
    if referenced and not lora:
        raise ConfigError(
            f"{', '.join(referenced)} on FSDP need LoRA (a `lora:` section): the reference is then the sharded model "
            "with its adapters off; a frozen full copy would not be sharded"
        )


def _finish(cfg: RunConfig, output_dir: Path, trainer: Any, model: nn.Module, tokenizer: Any, data: Datasets,
            collator: Collator, before: dict | None, runtime: float, progress: Progress | None = None,
            base: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    state = trainer.state
    metrics_extra = {"skipped_steps": trainer.stack.skipped} if trainer.stack.skip_budget else {}
    write_dir_atomic(output_dir / "model", lambda tmp: _save_model(model, tokenizer, tmp))
    metrics = measure(model, tokenizer, data, collator, before, progress)
    best_step = state.best_global_step if cfg.early_stopping is not None else None
    metrics.update(
        best_step=best_step, stopped_early=state.global_step < state.max_steps,
        global_step=state.global_step, train_runtime_s=round(runtime, 2), **metrics_extra,
    )  # fmt: skip
    finish = FinishContext(
        output_dir,
        lambda m: measure(m, tokenizer, data, collator, before, progress),
        lambda m, name: _save_as(m, tokenizer, output_dir / name),
    )
    metrics.update(trainer.stack.after_training(model, finish))  # ema, wise_ft: alternative final models
    if base:  # the base model's target loss, what read data.reference, lm-eval before/after, the run's wall time
        metrics["target"]["base_val_loss"] = base["val_loss"]
        metrics.update(final_record(cfg, model, tokenizer, base, state.log_history))
        metrics["wall_time_s"] = round(time.perf_counter() - base["started"], 2)
    write_text_atomic(output_dir / "config.yaml", dump_config(cfg))
    write_jsonl(output_dir / "history.jsonl", state.log_history)
    plot_curves(state.log_history, best_step, output_dir / "curves.png")
    write_text_atomic(output_dir / "model" / "README.md", run_card(cfg, metrics))
    write_json(output_dir / "metrics.json", metrics)
    write_final_scalars(trainer, metrics)  # TensorBoard, when training.report_to has it
    write_report([output_dir], output_dir / "report.html")
    return metrics


def _save_model(model: nn.Module, tokenizer: Any, directory: Path) -> None:
    # safetensors; for LoRA the adapter only, for OSF the merged model (models.merged_osf says why)
    (merged_osf(model) if is_osf(model) else model).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _save_as(model: nn.Module, tokenizer: Any, directory: Path) -> Path:
    write_dir_atomic(directory, lambda tmp: _save_model(model, tokenizer, tmp))
    return directory


def _reader(
    cfg: RunConfig, tokenizer: Any, labels: Labels | None, field: str = "replay.source"
) -> Callable[[str], list[dict]]:
    """Reads and encodes another data file (replay.source, ewc.data) as the reference data is read, with the run's
    classes (a file holding some of them gets the same ids)."""
    fmt = cfg.data.reference_format or cfg.data.format
    kw = {"overlap": cfg.data.window_overlap, "chat_loss": cfg.data.chat_loss, "labels": labels}
    return lambda path: load_split(path, field, fmt, cfg.task, tokenizer, cfg.data.max_length, **kw).encoded


def _read_batches(cfg: RunConfig, tokenizer: Any, data: Datasets, collator: Collator, args: Any, path: str,
                  field: str) -> Any:  # fmt: skip
    """SetupContext.read_batches: another data file (ewc.data) as batches, as reference_batches gives the reference."""
    rows = _reader(cfg, tokenizer, data.labels, field)(path)
    return batches_of(rows, collator, args.per_device_eval_batch_size, args.device)


def measure(
    model: nn.Module, tokenizer: Any, data: Datasets, collator: Collator, before: dict | None,
    progress: Progress | None = None,
) -> dict:  # fmt: skip
    """target.*, overfit_gap and forgetting.* of a trained model; with `progress`, each pass shows a display."""
    val_rows, train_rows = data.validation.encoded, data.train.encoded[:TRAIN_LOSS_ROWS]
    val = dataset_metrics(model, val_rows, collator, advance=start_pass(progress, "validation data", len(val_rows)))
    advance = start_pass(progress, "train data (loss)", len(train_rows))
    train_loss = dataset_metrics(model, train_rows, collator, advance=advance)["loss"]
    target = {"val_loss": val["loss"], "train_loss": train_loss}
    target.update({k: val[k] for k in ("accuracy", "f1") if k in val})
    metrics: dict[str, Any] = {"target": target, "overfit_gap": val["loss"] - train_loss}
    if before is not None:
        after = reference_metrics(model, tokenizer, data.reference, collator, progress)
        metrics["forgetting"] = forgetting(before, after)
    return metrics


def evaluate_saved(
    cfg: RunConfig, model_dir: Path, progress: Progress | None = None, data_file: Path | None = None
) -> dict[str, Any]:
    """`tether eval`: metrics of a saved model (a full model or a LoRA adapter over the configured base) on the
    configured validation and reference data (and evaluation.lm_eval's tasks when configured), or with `data_file`
    on that file alone (the result names it); with `progress`, each evaluation pass shows a display."""
    if not model_dir.is_dir():
        raise TetherError(f"--model {model_dir} is not a directory: pass a run's model/ directory")
    classes = cfg.task == "sequence_classification"
    if (model_dir / "adapter_config.json").exists():
        from peft import PeftModel

        labels = run_labels(cfg)  # the classes it was trained on
        base, tokenizer, _ = load_model(cfg.model, cfg.task, labels)
        model = PeftModel.from_pretrained(base, str(model_dir))
    else:
        saved = cfg.model.model_copy(update={"path": str(model_dir), "synthetic": None, "num_labels": None})
        model, tokenizer, _ = load_model(saved, cfg.task)
        labels = Labels.of_model(model.config) if classes else None
    check_positions(model, cfg.data.max_length)
    collator = Collator(tokenizer.pad_token_id)
    if data_file is not None:
        kw = {"overlap": cfg.data.window_overlap, "chat_loss": cfg.data.chat_loss, "labels": labels}
        split = load_split(str(data_file), "eval", cfg.data.format, cfg.task, tokenizer, cfg.data.max_length, **kw)
        advance = start_pass(progress, str(data_file), len(split.encoded))
        scores = dataset_metrics(model, split.encoded, collator, advance=advance)
        return {"data": str(data_file), "rows": split.stats.rows, "examples": split.stats.examples, **scores}
    data = load_datasets(cfg.data, cfg.task, tokenizer, labels)
    data = replace(data, reference=assign_roles(cfg, data.reference).measured)  # the rows the run measured
    advance = start_pass(progress, "validation data", len(data.validation.encoded))
    val = dataset_metrics(model, data.validation.encoded, collator, advance=advance)
    scored = cfg.data.validation or f"{cfg.data.train} (the validation_fraction split off)"
    out: dict[str, Any] = {
        "data": scored, "target": {"val_loss": val["loss"], **{k: v for k, v in val.items() if k != "loss"}}
    }  # fmt: skip
    if data.reference is not None:
        out["reference"] = reference_metrics(model, tokenizer, data.reference, collator, progress)
    if cfg.evaluation.lm_eval is not None:  # the scores of the saved model alone (metrics.json has the base's)
        from tether.lmeval import scores

        out["lm_eval"] = scores(model, tokenizer, cfg.evaluation.lm_eval)
    return out
