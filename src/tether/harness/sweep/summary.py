"""sweep.json's content: every trial, the Pareto fronts of the trials and of their candidate models, the chosen
model and the parameters' importance."""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tether.config import SWEEP_METRICS, SweepConfig
from tether.evaluate import pareto_indices
from tether.harness.sweep.objective import constraint_values
from tether.harness.sweep.study import Job, masked
from tether.selection import within_tolerance

log = logging.getLogger(__name__)


def _key(values: dict[str, float], objectives: list[str]) -> tuple[float, ...]:
    """Objective values with maximized ones negated: smaller is better everywhere."""
    return tuple(values[m] if SWEEP_METRICS[m] == "minimize" else -values[m] for m in objectives)


def non_dominated(items: list[dict[str, Any]], objectives: list[str]) -> list[dict[str, Any]]:
    """The items no other item dominates (at least as good on every objective, better on one)."""
    return [items[i] for i in pareto_indices([_key(i["values"], objectives) for i in items])]


def choose(items: list[dict[str, Any]], sweep: SweepConfig) -> dict[str, Any] | None:
    """The candidate picked by sweep.choose (see its help) among the feasible ones."""
    if not items:
        return None
    keys = [_key(i["values"], sweep.objectives) for i in items]
    if sweep.choose == "best_target" or len(sweep.objectives) == 1:
        return items[min(range(len(items)), key=lambda j: keys[j])]
    close = within_tolerance(range(len(items)), lambda j: keys[j][0], sweep.tolerance)
    return items[min(close, key=lambda j: (keys[j][1], keys[j][0]))]


def summarize(study: optuna.Study, job: Job) -> dict[str, Any]:
    """sweep.json: every trial, the Pareto front of the trials, the front of all candidate models, the chosen."""
    sweep = job.sweep
    trials = study.get_trials()
    pool = []
    for t in trials:
        if t.state != TrialState.COMPLETE:
            continue
        for c in t.user_attrs.get("candidates", []):
            if not all(m in c["metrics"] for m in [*sweep.objectives, *(k.metric for k in sweep.constraints)]):
                continue  # e.g. a WiSE-FT interpolation has no train loss: it cannot be judged on it
            feasible = all(v <= 0 for v in constraint_values(c["metrics"], sweep.constraints).values())
            values = {m: c["metrics"][m] for m in sweep.objectives}
            model_dir = str(Path(t.user_attrs["run_dir"]) / c["model"])
            pool.append({"trial": t.number, **c, "values": values, "feasible": feasible, "model_dir": model_dir})
    feasible = [c for c in pool if c["feasible"]]
    chosen = choose(feasible, sweep)
    return {
        "study": job.study_name,
        "storage": masked(job.storage),
        "requested_trials": job.trials,
        "objectives": [{"metric": m, "direction": SWEEP_METRICS[m]} for m in sweep.objectives],
        "constraints": [c.model_dump(exclude_none=True) for c in sweep.constraints],
        "choose": {"rule": sweep.choose, "tolerance": sweep.tolerance},
        "states": dict(Counter(t.state.name for t in trials)),
        "trials": [_trial_record(t, sweep.objectives) for t in trials],
        "pareto_front": sorted(t.number for t in study.best_trials),
        "candidates": [{**_brief(c, metrics=False), "feasible": c["feasible"]} for c in pool],
        "candidate_front": [_brief(c) for c in non_dominated(feasible, sweep.objectives)],
        "chosen": None if chosen is None else {**_brief(chosen), "params": trials[chosen["trial"]].params},
        "importance": importances(study, sweep.objectives),
    }


def _brief(c: dict[str, Any], metrics: bool = True) -> dict[str, Any]:
    keep = ("trial", "model", "alpha", "model_dir", "values", *(("metrics",) if metrics else ()))
    return {k: c[k] for k in keep if k in c}


def _trial_record(t: FrozenTrial, objectives: list[str]) -> dict[str, Any]:
    record: dict[str, Any] = {"number": t.number, "state": t.state.name, "params": t.params}
    if t.values is not None:
        record["values"] = dict(zip(objectives, t.values))
    for key in ("run_dir", "worker", "candidates", "surplus", "pruned_because"):
        if key in t.user_attrs:
            record[key] = t.user_attrs[key]
    if "failed_trial" in t.system_attrs:
        record["rerun_of"] = t.system_attrs["retry_history"][-1]
    if t.duration is not None:
        record["duration_s"] = round(t.duration.total_seconds(), 2)
    return record


def importances(study: optuna.Study, objectives: list[str]) -> dict[str, dict[str, float]]:
    """Parameter importance (Optuna's default PED-ANOVA) for each objective; {} with too few trials to tell."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}
    out = {}
    for i, name in enumerate(objectives):
        sign = 1.0 if SWEEP_METRICS[name] == "minimize" else -1.0  # PED-ANOVA ranks what makes the target low
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # the reminder of that, once per call
                target = lambda t, i=i, s=sign: s * t.values[i]  # noqa: E731
                out[name] = optuna.importance.get_param_importances(study, target=target)
        except (ValueError, RuntimeError) as e:  # e.g. every trial got the same values
            log.warning("parameter importance for %s not computed: %s", name, e)
    return out
