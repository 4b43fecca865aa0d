"""`tether sweep`: an Optuna study over config values, each trial a full `tether train` run in OUT/trial-<n>/.

The study lives in an Optuna RDB storage (SQLite file OUT/sweep.db by default; PostgreSQL or MySQL by URL), so
K worker processes on one machine and any number of machines with the same URL share it: the storage is the
only coordination. A sweep asks for N finished trials (completed or pruned) and every worker runs trials until
the study holds N:
- a trial whose worker dies (SIGKILL, a lost machine) stops sending heartbeats; after `stale_after_s` it is marked
  FAIL and a copy with the same values is queued, which resumes from the dead trial's last checkpoint in the same
  directory. Ctrl-C does the same at once. Re-running the command therefore resumes the sweep.
- when two workers start the last trial at the same instant, the one with the higher number sees that the N
  before it are taken, is marked FAIL (user attr `surplus`) before it trains, and nothing is counted twice.
Each trial also measures the alternative final models of its ema and wise_ft regularizers (computed from the
trained weights, no retraining) as candidates: the chosen model may be a trial's model_ema/ or model_wise_ft/.
Pruning: Optuna can only prune single-objective studies (Trial.report and should_prune raise for several
objectives), so intermediate eval losses prune only a sweep whose one objective is target.val_loss (median rule);
a trial whose loss turns NaN/inf is pruned in any sweep.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from transformers import TrainerCallback

from tether.config import SWEEP_METRICS, RunConfig, SweepConfig, SweepConstraint, with_values
from tether.errors import ConfigError, NonFiniteError, TetherError
from tether.evaluate import pareto_indices
from tether.outputs import save_png, write_json, write_text_atomic
from tether.selection import within_tolerance

log = logging.getLogger(__name__)
DONE = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts toward the requested number of trials
LIVE = (*DONE, TrialState.RUNNING, TrialState.WAITING)
MAX_RETRY = 3  # a trial whose worker keeps dying (out of memory) is given up after this many re-runs
POLL_S = 1.0  # how often a worker with nothing to start looks at the study again (a read)
CONFIG_ATTR = "tether_config"


@dataclass(frozen=True)
class Job:
    """What every worker needs to take part in the sweep (sent to the worker processes as JSON)."""

    cfg: RunConfig
    out: Path
    storage: str
    study_name: str
    trials: int

    def to_json(self) -> dict[str, Any]:
        return {"cfg": self.cfg.model_dump(mode="json"), "out": str(self.out), "storage": self.storage,
                "study_name": self.study_name, "trials": self.trials}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        cfg = RunConfig.model_validate(data["cfg"])
        return cls(cfg, Path(data["out"]), data["storage"], data["study_name"], data["trials"])

    @property
    def sweep(self) -> SweepConfig:
        assert self.cfg.sweep is not None
        return self.cfg.sweep


class Surplus(Exception):
    """The requested number of trials was already taken when this one started."""


def run_sweep(
    cfg: RunConfig,
    out: Path,
    *,
    study_name: str,
    trials: int | None = None,
    storage: str | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Run (or resume, or join) the sweep until it holds the requested trials; write sweep.json and sweep.html."""
    if cfg.sweep is None:
        raise ConfigError("the config has no sweep: section: add one with the params to search (see the README)")
    if workers < 1 or (trials is not None and trials < 1):
        raise ConfigError("--workers and --trials must be at least 1")
    if storage is None:
        out.mkdir(parents=True, exist_ok=True)  # the SQLite file goes there
    url = storage or f"sqlite:///{out.resolve() / 'sweep.db'}"
    job = Job(cfg, out.resolve(), url, study_name, trials or cfg.sweep.trials)
    study = open_study(job, check_new=True)
    out.mkdir(parents=True, exist_ok=True)
    if finished(study) < job.trials:  # else a re-run only writes the report again
        if workers == 1:
            run_worker(job, 0)
        else:
            _run_processes(job, workers)
    study = open_study(job)
    summary = summarize(study, job)
    write_outputs(study, summary, job.out)
    return summary


def _run_processes(job: Job, workers: int) -> None:
    # Small models gain little from several threads, and K workers x all cores oversubscribe the machine.
    threads = max(1, (os.cpu_count() or 1) // workers)
    # Plain interpreters, not multiprocessing: spawn would re-import the caller's main script in each worker.
    procs = []
    for index in range(workers):
        proc = subprocess.Popen([sys.executable, "-c", WORKER_MAIN], stdin=subprocess.PIPE)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps({"job": job.to_json(), "index": index, "threads": threads}).encode())
        proc.stdin.close()
        procs.append(proc)
    try:
        codes = [proc.wait() for proc in procs]
    except KeyboardInterrupt:
        for proc in procs:  # they got the same Ctrl-C and are queueing their trials again
            proc.wait()
        raise
    failed = [f"worker {i}" for i, code in enumerate(codes) if code != 0]
    if failed:
        raise TetherError(
            f"{', '.join(failed)} stopped with an error (above); finished trials are kept in the study: fix the "
            "cause and run the same command again to resume"
        )


WORKER_MAIN = "from tether.harness.sweep import worker_main; worker_main()"


def worker_main() -> None:
    """Entry point of a worker process: {job, index, threads} as JSON on stdin; user errors as one line."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    given = json.load(sys.stdin)
    job, index, threads = Job.from_json(given["job"]), given["index"], given["threads"]
    try:
        run_worker(job, index, threads)
    except TetherError as e:
        print(f"error: worker {index}: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def run_worker(job: Job, index: int, threads: int | None = None) -> None:
    """One worker: start trials until the study holds the requested number of finished ones."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    _quiet()
    study = open_study(job)
    objective = Objective(job, index)
    while True:
        optuna.storages.fail_stale_trials(study)  # dead workers' trials -> FAIL, and their re-runs queued
        counts = Counter(t.state for t in study.get_trials(deepcopy=False))
        done = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
        if done >= job.trials:
            return
        if counts[TrialState.WAITING] == 0 and done + counts[TrialState.RUNNING] >= job.trials:
            time.sleep(POLL_S)  # the rest are running elsewhere; if one of them dies its re-run is queued
            continue
        try:
            study.optimize(objective, n_trials=1, catch=(Surplus,), callbacks=[objective.announce])
        except KeyboardInterrupt:
            objective.requeue(study)
            raise


def finished(study: optuna.Study) -> int:
    """Trials that count toward the requested number: completed or pruned."""
    return len(study.get_trials(deepcopy=False, states=DONE))


def _quiet() -> None:
    """Spawned workers start with fresh logging: keep the per-file save bars and Optuna's chatter out."""
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.disable_progress_bar()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures reach the user as tether errors, once
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def open_study(job: Job, check_new: bool = False) -> optuna.Study:
    """The study in the storage, created on first use; refuses a study made from another config."""
    _quiet()
    directions = [SWEEP_METRICS[m] for m in job.sweep.objectives]
    try:
        storage = optuna.storages.RDBStorage(
            job.storage,
            engine_kwargs=_engine_kwargs(job.storage),
            heartbeat_interval=max(1, job.sweep.stale_after_s // 4),
            grace_period=job.sweep.stale_after_s,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
        )
        study = optuna.create_study(
            storage=storage, study_name=job.study_name, directions=directions, sampler=_sampler(),
            pruner=optuna.pruners.MedianPruner() if prunable(job.sweep) else optuna.pruners.NopPruner(),
            load_if_exists=True,
        )  # fmt: skip
    except ImportError as e:
        raise TetherError(f"--storage {_masked(job.storage)}: no database driver ({e}): install it") from None
    except SQLAlchemyError as e:  # a bad URL, host down, wrong password: all a bad --storage for the user
        first = str(e).strip().splitlines()[0]
        raise TetherError(f"--storage {_masked(job.storage)}: cannot use the database ({first})") from None
    _check_config(study, job, check_new)
    return study


def _engine_kwargs(url: str) -> dict[str, Any]:
    # SQLite lets one writer at a time in and makes the others wait at most `timeout` seconds (5 by default):
    # K workers, their heartbeats and a report can queue longer than that.
    return {"connect_args": {"timeout": 60}} if make_url(url).get_backend_name() == "sqlite" else {}


def _masked(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except SQLAlchemyError:  # an unparsable URL: show it without its credentials part
        return url.split("@")[-1]


def _sampler() -> optuna.samplers.BaseSampler:
    # TPE handles several objectives and the constraints set on trials; constant_liar: parallel workers see running
    # trials as bad, so that they do not all sample the same point.
    return optuna.samplers.TPESampler(constant_liar=True)


def prunable(sweep: SweepConfig) -> bool:
    """Whether intermediate evaluations can prune: Optuna prunes single-objective studies only."""
    return sweep.objectives == ["target.val_loss"]


def _identity(job: Job) -> str:
    """The config as the study must keep it: everything but where this machine writes and how many trials."""
    raw = job.cfg.model_dump(mode="json", exclude={"output_dir"})
    raw["sweep"].pop("trials")
    return json.dumps(raw, sort_keys=True)


def _check_config(study: optuna.Study, job: Job, check_new: bool) -> None:
    stored = study.user_attrs.get(CONFIG_ATTR)
    if stored is None:
        if check_new and any(job.out.glob("trial-*")):
            raise TetherError(
                f"{job.out} holds trial directories of another study (the storage has no study "
                f"'{job.study_name}'): choose another --output-dir, or pass the --storage and --study they belong to"
            )
        study.set_user_attr(CONFIG_ATTR, _identity(job))
    elif stored != _identity(job):
        raise TetherError(
            f"study '{job.study_name}' in {_masked(job.storage)} was made from a different config (search space, "
            "objectives or run settings): pass another --study, or the config it was made from"
        )


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
    """The SWEEP_METRICS keys present in a metrics.json-shaped dict, by dotted name."""
    out = {}
    for name in SWEEP_METRICS:
        node: Any = metrics
        for part in name.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, (int, float)) and not isinstance(node, bool):
            out[name] = float(node)
    return out


def candidates(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The models a trial leaves, each with its flat metrics: model/, and model_ema/ and model_wise_ft/ when the
    ema and wise_ft regularizers made them from the trained weights."""
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
        "storage": _masked(job.storage),
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


def write_outputs(study: optuna.Study, summary: dict[str, Any], out: Path) -> None:
    """sweep.json, sweep_pareto.png, sweep_importance.png and sweep.html (the plots inlined, and the tables)."""
    from tether.report.html import page, png_tag, table_tag

    write_json(out / "sweep.json", summary)
    objectives = [o["metric"] for o in summary["objectives"]]
    chosen = summary["chosen"]
    front = [
        {"trial": c["trial"], "model": _label(c), **c["values"], "chosen": "chosen" if _same(c, chosen) else None}
        for c in summary["candidate_front"]
    ]
    save_png(pareto_figure(summary), out / "sweep_pareto.png")
    pareto = png_tag(out / "sweep_pareto.png", "Pareto plot")
    sections = [
        ("Summary", _summary_html(summary)),
        ("Pareto front", pareto + table_tag(front, ["trial", "model", *objectives, "chosen"])),
    ]
    if summary["importance"]:
        save_png(importance_figure(summary["importance"]), out / "sweep_importance.png")
        sections.append(("Parameter importance", png_tag(out / "sweep_importance.png", "parameter importance")))
    rows = [{**t, **t.get("values", {}), **t["params"]} for t in summary["trials"]]
    params = sorted({p for t in summary["trials"] for p in t["params"]})
    sections.append(("All trials", table_tag(rows, ["number", "state", *objectives, *params, "run_dir"])))
    write_text_atomic(out / "sweep.html", page(f"tether sweep: {summary['study']}", sections))


def _label(c: dict[str, Any]) -> str:
    return c["model"] + (f" (alpha {c['alpha']:g})" if "alpha" in c else "")


def _same(a: dict[str, Any], b: dict[str, Any] | None) -> bool:
    return b is not None and (a["trial"], a["model"]) == (b["trial"], b["model"])


def _summary_html(summary: dict[str, Any]) -> str:
    import html

    chosen = summary["chosen"]
    states = ", ".join(f"{n} {s.lower()}" for s, n in summary["states"].items())
    text = f"<p>Study <b>{html.escape(summary['study'])}</b> in {html.escape(summary['storage'])}: {states}.</p>"
    if chosen is None:
        return text + "<p>No completed trial meets the constraints: nothing chosen.</p>"
    rule = summary["choose"]
    values = ", ".join(f"{m} {v:.4g}" for m, v in chosen["values"].items())
    params = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in chosen["params"].items())
    return text + (
        f"<p>Chosen by {rule['rule']} (tolerance {rule['tolerance']:g}): trial {chosen['trial']}, "
        f"<code>{html.escape(chosen['model_dir'])}</code>: {html.escape(values)}; with {html.escape(params)}.</p>"
    )


def pareto_figure(summary: dict[str, Any]) -> Any:
    """Every candidate model of the completed trials on the first two objectives (one objective: against the trial
    number); the non-dominated ones joined, the chosen one starred, infeasible ones crossed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [o["metric"] for o in summary["objectives"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))

    def xy(c: dict[str, Any]) -> tuple[float, float]:
        values = c["values"]
        return (values[names[0]], values[names[1]]) if len(names) > 1 else (c["trial"], values[names[0]])

    styles = {"model": ("o", "tab:blue"), "model_ema": ("s", "tab:orange"), "model_wise_ft": ("^", "tab:green")}
    for model, (marker, color) in styles.items():
        for feasible in (True, False):
            pts = [xy(c) for c in summary["candidates"] if c["model"] == model and c["feasible"] == feasible]
            if pts:
                label = f"{model}/" + ("" if feasible else " (fails a constraint)")
                ax.scatter(*zip(*pts), marker=marker if feasible else "x", color=color, alpha=0.6, label=label)
    for c in summary["candidates"]:
        if c["model"] == "model":
            ax.annotate(str(c["trial"]), xy(c), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = sorted(xy(c) for c in summary["candidate_front"])
    if front:
        ax.plot(*zip(*front), color="black", linewidth=1, label="Pareto front")
    if summary["chosen"] is not None:
        ax.scatter(*xy(summary["chosen"]), marker="*", s=250, color="crimson", zorder=5, label="chosen")
    ax.set_xlabel(names[0] if len(names) > 1 else "trial")
    ax.set_ylabel(names[1] if len(names) > 1 else names[0])
    ax.set_title(f"study {summary['study']}: {summary['states'].get('COMPLETE', 0)} completed trials")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def importance_figure(importance: dict[str, dict[str, float]]) -> Any:
    """Horizontal bars: each parameter's importance for each objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = sorted({p for imp in importance.values() for p in imp})
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(params) * len(importance) + 1.2))
    height = 0.8 / len(importance)
    for i, (objective, imp) in enumerate(importance.items()):
        ys = [j + i * height for j in range(len(params))]
        ax.barh(ys, [imp.get(p, 0.0) for p in params], height=height, label=objective)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(params))], params)
    ax.set_xlabel("importance (PED-ANOVA, normalized per objective)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def summary_table(summary: dict[str, Any]) -> Any:
    """The non-dominated candidate models as a rich table, the chosen one marked."""
    from rich.table import Table

    objectives = [o["metric"] for o in summary["objectives"]]
    states = ", ".join(f"{n} {s.lower()}" for s, n in summary["states"].items())
    table = Table(title=f"study {summary['study']}: Pareto front of the candidate models ({states})")
    for col in ("trial", "model", *objectives, ""):
        table.add_column(col, justify="right" if col in objectives else "left")
    for c in summary["candidate_front"]:
        mark = "chosen" if _same(c, summary["chosen"]) else ""
        table.add_row(str(c["trial"]), _label(c), *(f"{c['values'][m]:.4g}" for m in objectives), mark)
    return table
