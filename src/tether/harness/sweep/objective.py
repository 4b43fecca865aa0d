"""One trial: the sampled values applied to the config, a full training run (pruned when hopeless), its metrics
as the objectives and its candidate models."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from transformers import TrainerCallback

from tether.config import SWEEP_METRICS, RunConfig, SweepConstraint, lm_eval_names, with_values
from tether.errors import NonFiniteError
from tether.harness.sweep.study import DONE, MAX_RETRY, Job, prunable

LIVE = (*DONE, TrialState.RUNNING, TrialState.WAITING)


class Surplus(Exception):
    """The requested number of trials was already taken when this one started."""


class PruneOnEvaluate(TrainerCallback):
    """Reports each evaluation's loss to the trial and stops the run when the pruner calls it hopeless."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kw: Any) -> None:
        if metrics and "eval_loss" in metrics:
            self.trial.report(metrics["eval_loss"], state.global_step)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"eval_loss {metrics['eval_loss']:.4g} at step {state.global_step}")


class Objective:
    """One trial: the sampled values applied to the config, a full training run, its metrics as objectives."""

    def __init__(self, job: Job, worker: int) -> None:
        self.job = job
        self.worker = worker
        self.current: int | None = None  # the number of the trial running here, for a Ctrl-C re-queue

    def __call__(self, trial: optuna.Trial) -> list[float]:
        self.current = trial.number
        trials = trial.study.get_trials(deepcopy=False)
        if _surplus(trials, trial.number, self.job.trials):
            trial.set_user_attr("surplus", True)
            raise Surplus(f"{self.job.trials} trials were already taken when trial {trial.number} started")
        values = {path: suggest(trial, path, p) for path, p in self.job.sweep.params.items()}
        first = trials[trial.number].system_attrs.get("failed_trial")  # a re-run goes on in the dead one's directory
        run_dir = self.job.out / f"trial-{trial.number if first is None else first}"
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        cfg = with_values(self.job.cfg, values).model_copy(update={"output_dir": str(run_dir)})
        metrics = self._train(cfg, run_dir, trial, resumed=first is not None)
        trial.set_user_attr("candidates", candidates(metrics))
        for key, value in constraint_values(flat_metrics(metrics), self.job.sweep.constraints).items():
            trial.set_constraint(key, value)  # Optuna's samplers and Pareto front keep to the feasible trials
        return [flat_metrics(metrics)[m] for m in self.job.sweep.objectives]

    def _train(self, cfg: RunConfig, run_dir: Path, trial: optuna.Trial, resumed: bool) -> dict[str, Any]:
        from tether.run import train

        if resumed and (run_dir / "metrics.json").is_file():  # it finished; only telling the study was lost
            return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        callbacks = [PruneOnEvaluate(trial)] if prunable(self.job.sweep) else []
        try:
            return train(cfg, run_dir, callbacks=callbacks)
        except NonFiniteError as e:
            trial.set_user_attr("pruned_because", str(e))
            raise optuna.TrialPruned(str(e)) from None

    def announce(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.current = None
        if trial.user_attrs.get("surplus"):
            return
        values = ", ".join(f"{m} {v:.4g}" for m, v in zip(self.job.sweep.objectives, trial.values or []))
        seconds = trial.duration.total_seconds() if trial.duration else 0.0
        print(f"trial {trial.number} {trial.state.name.lower()} in {seconds:.1f} s (worker {self.worker})"
              + (f": {values}" if values else ""), flush=True)  # fmt: skip

    def requeue(self, study: optuna.Study) -> None:
        """After Ctrl-C: queue the interrupted trial again, as for a dead worker, so a re-run resumes it."""
        if self.current is None:
            return
        trial = study.get_trials(deepcopy=False)[self.current]
        if trial.state == TrialState.FAIL and not trial.user_attrs.get("surplus"):
            optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)


def _surplus(trials: list[FrozenTrial], number: int, requested: int) -> bool:
    """Whether the trials numbered before this one already make the requested number (finished or running)."""
    return sum(t.number < number and t.state in LIVE for t in trials) >= requested


def suggest(trial: optuna.Trial, path: str, param: Any) -> Any:
    """The trial's value for one searched path (a re-run trial gets its original value back)."""
    if param.distribution == "categorical":
        return trial.suggest_categorical(path, param.choices)
    if param.distribution == "int":
        return trial.suggest_int(path, int(param.low), int(param.high))
    return trial.suggest_float(path, param.low, param.high, log=param.distribution == "log_uniform")


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The SWEEP_METRICS keys (lm-eval scores included) present in a metrics.json-shaped dict, by dotted name."""
    out = {}
    for name in [*SWEEP_METRICS, *lm_eval_names(metrics)]:
        node: Any = metrics
        for part in name.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, (int, float)) and not isinstance(node, bool):
            out[name] = float(node)
    return out


def candidates(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The models a trial leaves, each with its flat metrics: model/, and model_ema/, model_wise_ft/ and model_merge/
    when the ema, wise_ft and merge regularizers made them from the trained weights."""
    out = [{"model": "model", "metrics": flat_metrics(metrics)}]
    if "ema" in metrics:
        out.append({"model": "model_ema", "metrics": flat_metrics(metrics["ema"])})
    if "wise_ft" in metrics and metrics["wise_ft"]["chosen_alpha"] != 1:  # alpha 1 is model/ itself
        alpha = metrics["wise_ft"]["chosen_alpha"]
        row = next(r for r in metrics["wise_ft"]["alphas"] if r["alpha"] == alpha)
        forgetting = {"delta_loss": row.get("delta_loss"), "reference_loss_after": row.get("reference_loss")}
        if "recall" in row:
            before = metrics["forgetting"]["recall_before"]
            forgetting.update(recall_after=row["recall"], recall_drop=before - row["recall"])
        wise = {"target": {"val_loss": row["val_loss"]}, "forgetting": forgetting}
        out.append({"model": "model_wise_ft", "alpha": alpha, "metrics": flat_metrics(wise)})
    if "merge" in metrics and metrics["merge"]["chosen"] != "global 1":  # global 1 is model/ itself
        out.append({"model": "model_merge", "metrics": flat_metrics(metrics["merge"])})
    return out


def constraint_values(flat: dict[str, float], constraints: list[SweepConstraint]) -> dict[str, float]:
    """Optuna's form: one value per bound, named by it, <= 0 when it holds."""
    values = {}
    for c in constraints:
        if c.max is not None:
            values[f"{c.metric}<={c.max:g}"] = flat[c.metric] - c.max
        if c.min is not None:
            values[f"{c.metric}>={c.min:g}"] = c.min - flat[c.metric]
    return values
