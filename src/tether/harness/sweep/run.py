"""`tether sweep` itself: run, resume or join the study with K worker processes until it holds the requested
trials, then write the report."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from tether.config import RunConfig
from tether.errors import ConfigError, TetherError
from tether.harness.sweep.objective import Objective, Surplus
from tether.harness.sweep.report import write_outputs
from tether.harness.sweep.study import Job, finished, open_study
from tether.harness.sweep.summary import summarize

POLL_S = 1.0  # how often a worker with nothing to start looks at the study again (a read)


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


WORKER_MAIN = "from tether.harness.sweep.run import worker_main; worker_main()"


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
    study = open_study(job)  # quiets the logging first
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
