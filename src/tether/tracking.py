"""Forgetting tracked during training, history.jsonl written as it grows, and the choice on target and retention.

At every evaluation of the Trainer, RunLog measures
  eval_reference_loss  the loss on the measured reference rows (tether.roles), eval_forgetting its increase over the
                       base model's, eval_recall the greedy fact recall for prompt/completion reference data;
  eval_probe_kl        KL(original || model) per loss token on a fixed probe of training rows: a cheap predictor of
                       forgetting that needs no reference data. The original's logits come from the run's frozen
                       reference (tether.reference, with its row cache: under LoRA the model with its adapters off)
                       or, for full fine-tuning without one, from a snapshot taken before the first step (no copy of
                       the model is made; evaluation.probe_mb caps it);
  eval_lm_eval/<task>/<metric>  with evaluation.lm_eval.at_evaluations, lm-eval's scores (tether.lmeval);
and, with early_stopping.forgetting_budget, eval_choice: the early-stopping metric where the forgetting is within
the budget, else a value worse than any such one (OUTSIDE plus the forgetting, so that among evaluations that all
exceed the budget the least forgetting wins). The Trainer's best checkpoint and EarlyStoppingCallback then watch
eval_choice: the best target among evaluations within the budget.

The measures are added to the evaluation's own log entry before the other callbacks see it (RunLog goes first), so
TensorBoard (eval/reference_loss, ...), the best-model choice, early stopping and history.jsonl all get them.
history.jsonl is rewritten when training begins (a resumed run starts from its checkpoint's history) and appended
at every log, so a long run can be followed while it runs; the run rewrites it whole at the end.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from tether.config import LmEvalConfig, RunConfig
from tether.data import Collator, Datasets, Split
from tether.distributed import from_main_process, is_main_process
from tether.errors import TetherError, one_line
from tether.evaluate import dataset_metrics, reference_metrics, start_pass
from tether.outputs import write_jsonl
from tether.reference import Reference, ReferenceOptions, at_positions, evaluating, is_peft, loss_positions

log = logging.getLogger(__name__)
OUTSIDE = 1e6  # eval_choice of an evaluation over the forgetting budget: worse than any loss within it
PROBE_BATCH = 8
WORSE_THAN_BASE = 1.05  # eval_loss above the base model's by more than this factor is warned of (not noise)


class Probe:
    """Fixed training rows and the original model's logits on them: kl(model) is KL(original || model) per token."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], reference: Reference | None,
                 snapshot: list[torch.Tensor] | None) -> None:  # fmt: skip
        self.batches = batches
        self.reference = reference
        self.snapshot = snapshot

    @classmethod
    def build(cls, model: nn.Module, rows: list[dict], collator: Collator, reference: Reference | None,
              max_bytes: int) -> Probe | None:  # fmt: skip
        """A probe over `rows` (the first training rows). With a reference (the run's, or LoRA's adapters off) its
        logits are asked at each evaluation; without one they are taken now, from `model` before training, keeping
        the rows whose logits fit in max_bytes (at least one)."""
        if not rows:
            return None
        if reference is None and is_peft(model):
            reference = Reference.build(model, ReferenceOptions(cache_mb=max(1, max_bytes // 2**20)))
        if reference is not None:
            return cls(_batches(rows, collator), reference, None)
        vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else 1
        kept = _fitting(rows, vocab, max_bytes)
        batches = _batches(kept, collator)
        return cls(batches, None, [_logits_at_loss(model, b).cpu() for b in batches])

    @torch.no_grad()
    def kl(self, model: nn.Module) -> float:
        """Mean over the probe's loss positions of KL(original || model), in nats."""
        device = next(model.parameters()).device
        total, count = 0.0, 0
        with evaluating(model):
            for i, cpu_batch in enumerate(self.batches):
                batch = {k: v.to(device) for k, v in cpu_batch.items()}
                if self.reference is not None:
                    teacher = self.reference.logits(batch)
                    original = teacher[0 : len(teacher)].float()
                    self.reference.clear()
                else:
                    original = self.snapshot[i].to(device)
                current = _logits_at_loss(model, batch)
                kl = F.kl_div(current.log_softmax(-1), original.log_softmax(-1), log_target=True, reduction="sum")
                total += kl.item()
                count += len(current)
        return total / max(count, 1)


def _batches(rows: list[dict], collator: Collator) -> list[dict[str, torch.Tensor]]:
    return [collator(rows[i : i + PROBE_BATCH]) for i in range(0, len(rows), PROBE_BATCH)]


def _fitting(rows: list[dict], vocab: int, max_bytes: int) -> list[dict]:
    """The first rows whose loss positions' fp32 logits fit in max_bytes (at least one row)."""
    kept, used = [], 0
    for row in rows:
        labels = row["labels"]
        positions = 1 if isinstance(labels, int) else sum(label != -100 for label in labels[1:])
        used += positions * vocab * 4
        if kept and used > max_bytes:
            break
        kept.append(row)
    return kept


def _logits_at_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's fp32 logits at the batch's loss positions, [positions, vocab] in loss_positions order."""
    with torch.no_grad(), evaluating(model):
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    rows, cols = loss_positions(batch["labels"])
    return at_positions(logits, rows, cols).float()


class Budget:
    """The rule over target and retention: `metric` counts only where `measure` <= `limit`."""

    def __init__(self, metric: str, greater_is_better: bool, measure: str, limit: float) -> None:
        self.metric = metric if metric.startswith("eval_") else f"eval_{metric}"
        self.greater_is_better = greater_is_better
        self.measure = {"delta_loss": "eval_forgetting", "probe_kl": "eval_probe_kl"}[measure]
        self.limit = limit

    def choice(self, logs: dict[str, float]) -> dict[str, float]:
        forgetting, value = logs[self.measure], logs[self.metric]
        within = forgetting <= self.limit
        choice = value if within else (OUTSIDE + forgetting) * (-1 if self.greater_is_better else 1)
        return {"eval_within_budget": float(within), "eval_choice": choice}


class RunLog(TrainerCallback):
    """Adds the tracked measures to each evaluation's log entry and keeps history.jsonl up to date (see the module
    docstring). Inactive parts: no history without a path (other processes), no tracking before start()."""

    def __init__(self, history: Path | None, budget: Budget | None = None, base_val_loss: float | None = None) -> None:
        self.history = history
        self.budget = budget
        self.base_val_loss = base_val_loss  # the untrained model's, on the same validation rows (main process)
        self.model: nn.Module | None = None
        self.tokenizer: Any = None
        self.measured: Split | None = None
        self.before: dict[str, float] | None = None
        self.collator: Collator | None = None
        self.probe: Probe | None = None
        self.lm_eval: LmEvalConfig | None = None

    def start(self, model: nn.Module, tokenizer: Any, collator: Collator, measured: Split | None,
              before: dict[str, float] | None, probe: Probe | None) -> None:  # fmt: skip
        """Track from now on: the measured rows and the base model's measures on them, and the probe."""
        self.model, self.tokenizer, self.collator = model, tokenizer, collator
        self.measured, self.before, self.probe = measured, before, probe

    def measure(self, model: nn.Module) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.measured is not None and self.before is not None:
            ref = reference_metrics(model, self.tokenizer, self.measured, self.collator)
            out.update(eval_reference_loss=ref["loss"], eval_forgetting=ref["loss"] - self.before["loss"])
            if "recall" in ref:
                out["eval_recall"] = ref["recall"]
        if self.probe is not None:
            out["eval_probe_kl"] = self.probe.kl(model)
        if self.lm_eval is not None and self.lm_eval.at_evaluations:
            out.update(self.lm_eval_logs(model))
        return out

    def lm_eval_logs(self, model: nn.Module) -> dict[str, float]:
        """lm-eval's scores as log keys, computed by the main process alone (lm-eval returns its results there only;
        under DDP each process holds the whole model) and shared, so that every process's early stopping reads
        the same numbers. FSDP, where each forward is collective, is refused (run.check_sharding)."""
        logs: dict[str, float] = {}
        failure: Exception | None = None
        if is_main_process():
            from tether.lmeval import scores

            try:
                for task, values in scores(model, self.tokenizer, self.lm_eval).items():
                    logs.update({f"eval_lm_eval/{task}/{metric}": v for metric, v in values.items()})
            except Exception as e:  # said to every process: the others would wait for the scores until timeout
                failure = e
        logs, said = from_main_process((logs, None if failure is None else one_line(failure)))
        if failure is not None:
            raise failure
        if said is not None:
            raise TetherError(f"lm-eval failed on the main process at this evaluation: {said}")
        return logs

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.history is not None:
            write_jsonl(self.history, state.log_history)  # a resumed run: the checkpoint's history so far

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs is not None and "eval_loss" in logs:
            self.warn_if_worse_than_base(logs["eval_loss"], state.global_step)
        if logs is not None and "eval_loss" in logs and self.model is not None:
            tracked = self.measure(self.model)
            if self.budget is not None:
                tracked.update(self.budget.choice({**logs, **tracked}))
            logs.update(tracked)  # the dict the Trainer's other callbacks and best-model choice read next
            entry = state.log_history[-1] if state.log_history else {}
            if entry.get("step") == state.global_step and "eval_loss" in entry:
                entry.update(tracked)
        if self.history is not None and state.log_history:
            with self.history.open("a", encoding="utf-8") as f:
                f.write(json.dumps(state.log_history[-1]) + "\n")  # as write_jsonl writes it

    def warn_if_worse_than_base(self, eval_loss: float, step: int) -> None:
        """Once per run: the training loss can fall (a reweighted loss such as dft's, an overfit) while the task's
        validation loss rises above the untrained model's, which no logged loss shows on its own."""
        base = self.base_val_loss
        if base is None or eval_loss <= base * WORSE_THAN_BASE:
            return
        log.warning(
            "eval_loss %.4g at step %d is above the base model's %.4g on the same validation rows: training is making "
            "the task worse (a learning rate too high, or dft / eaft at a high strength on a task the base model "
            "finds unlikely: see the README)", eval_loss, step, base,
        )  # fmt: skip
        self.base_val_loss = None


def budget_of(cfg: RunConfig) -> Budget | None:
    """The early-stopping rule over target and retention, when early_stopping.forgetting_budget is set."""
    es = cfg.early_stopping
    if es is None or es.forgetting_budget is None:
        return None
    return Budget(es.metric, es.mode == "max", es.forgetting_measure, es.forgetting_budget)


def start_tracking(run_log: RunLog, cfg: RunConfig, trainer: Any, tokenizer: Any, collator: Collator, data: Datasets,
                   before: dict[str, float] | None) -> None:  # fmt: skip
    """Put run_log first among the Trainer's callbacks (its measures reach the others' view of each evaluation) and
    start tracking: the measured reference rows and the probe of training rows. Every process measures, the same rows
    in the same order: under FSDP each forward gathers the layers' weights collectively (the main process alone
    would wait for the others). Off under DeepSpeed, where it is untested (said in the log; a forgetting budget is
    refused there: run.check_sharding)."""
    handler = trainer.callback_handler
    handler.callbacks.remove(run_log)
    handler.callbacks.insert(0, run_log)
    ev = cfg.evaluation
    if not ev.track:
        return
    if trainer.is_deepspeed_enabled:
        log.warning("forgetting is not tracked during training under DeepSpeed; it is measured after training")
        return
    model = trainer.model
    rows = data.train.encoded[: ev.probe_rows]
    probe = Probe.build(model, rows, collator, trainer.stack.reference, ev.probe_mb * 2**20) if rows else None
    run_log.start(model, tokenizer, collator, data.reference, before, probe)
    run_log.lm_eval = ev.lm_eval


def measure_base(cfg: RunConfig, model: nn.Module, tokenizer: Any, data: Datasets, collator: Collator,
                 progress: Any = None) -> dict[str, Any]:  # fmt: skip
    """The base model's target validation loss, and its lm-eval scores when configured (before LoRA is applied)."""
    advance = start_pass(progress, "validation data (base model)", len(data.validation.encoded))
    val = dataset_metrics(model, data.validation.encoded, collator, advance=advance)
    out: dict[str, Any] = {"val_loss": val["loss"]}
    if cfg.evaluation.lm_eval is not None:
        from tether.lmeval import scores

        out["lm_eval"] = scores(model, tokenizer, cfg.evaluation.lm_eval)
    return out


def final_record(cfg: RunConfig, model: nn.Module, tokenizer: Any, base: dict[str, Any],
                 history: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """metrics.json entries next to the measures of the result: reference_roles, lm_eval before/after, and with a
    forgetting budget what the choice did (forgetting_budget)."""
    out: dict[str, Any] = {"reference_roles": base["roles"]}
    if cfg.evaluation.lm_eval is not None:
        from tether.lmeval import compare, scores

        out["lm_eval"] = compare(base["lm_eval"], scores(model, tokenizer, cfg.evaluation.lm_eval))
    rule = budget_of(cfg)
    if rule is not None:
        out["forgetting_budget"] = budget_record(rule, history)
    return out


def budget_record(rule: Budget, history: list[dict[str, Any]]) -> dict[str, Any]:
    """The budget, how many evaluations were within it, and the evaluation the target metric alone would have
    chosen (its forgetting as tracked), next to the restored one (best_step)."""
    evals = [e for e in history if "eval_choice" in e]
    record: dict[str, Any] = {
        "limit": rule.limit,
        "measure": rule.measure.removeprefix("eval_"),
        "evaluations": len(evals),
    }
    record["within"] = sum(e["eval_within_budget"] == 1.0 for e in evals)
    if evals:
        pick = max if rule.greater_is_better else min
        alone = pick(evals, key=lambda e: e[rule.metric])
        record["target_only"] = {
            "step": alone["step"],
            rule.metric: alone[rule.metric],
            "forgetting": alone[rule.measure],
        }
    return record
