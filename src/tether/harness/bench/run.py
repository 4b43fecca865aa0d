"""`tether bench` itself: plan, run the unfinished jobs in worker processes (resumable), measure, write, show."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console

from tether.errors import ConfigError, TetherError
from tether.harness.bench.analysis import aggregate, checks, points_of
from tether.harness.bench.report import show, write_outputs
from tether.harness.bench.tasks import Job, plan
from tether.outputs import write_json

DONE = "wall.json"  # written last in a run directory: the run is finished


def run_bench(output_dir: Path, *, quick: bool, seeds: int, workers: int, console: Console) -> dict[str, Any]:
    """Run (or resume) the benchmark, write bench.json, bench.md, pareto.png and bench.html, print the tables and
    the checks; returns what bench.json holds."""
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: give at least 1 (3 or more for a spread)")
    if workers < 1:
        raise ConfigError(f"--workers {workers}: give at least 1")
    started = time.perf_counter()
    bases = pretrained_bases(seeds, console)
    jobs = plan(output_dir, seeds, quick, bases)
    todo = [j for j in jobs if not (j.run_dir / DONE).exists()]
    console.print(
        f"bench: {len(jobs)} runs, {len(jobs) - len(todo)} already finished, {workers} workers: {output_dir}"
    )
    run_jobs(todo, workers, output_dir / "workers.log", console)
    finished = [(job, *read_run(job.run_dir)) for job in jobs]
    points = [p for job, metrics, wall_s in finished for p in points_of(job, metrics, wall_s)]
    rows = aggregate(points)
    run_time = sum(wall_s for _, _, wall_s in finished)
    summary = f"{len(jobs)} runs, {len(todo)} run now in {time.perf_counter() - started:.0f} s wall time"
    result = {
        "command": f"tether bench{' --quick' if quick else ''} --seeds {seeds} --workers {workers}",
        "machine": f"{os.cpu_count()} CPU cores, torch {_torch_version()}",
        "summary": f"{summary} ({run_time:.0f} s summed over all runs)",
        "checks": [asdict(c) | {"line": c.line()} for c in checks(rows)],
        "aggregates": rows,
        "runs": points,
    }
    write_outputs(result, output_dir)
    show(result, console)
    return result


def pretrained_bases(seeds: int, console: Console) -> dict[int, Any]:
    from tether.synthetic import pretrained_base

    with console.status("pre-trained bases (each built once and cached)"):
        return {seed: pretrained_base(seed=seed) for seed in range(seeds)}


def read_run(path: Path) -> tuple[dict[str, Any], float]:
    metrics = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
    return metrics, json.loads((path / DONE).read_text(encoding="utf-8"))["wall_s"]


def run_jobs(jobs: list[Job], workers: int, log_path: Path, console: Console) -> None:
    """Run the jobs in `workers` spawned processes; the first failure stops the rest (finished runs are kept)."""
    from tether.progress import progress_bar

    if not jobs:
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")  # fork after torch has started its threads can deadlock
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(str(log_path),))
    with progress_bar(console) as bar:
        task = bar.add_task("bench runs", total=len(jobs), info="")
        futures = {pool.submit(execute, job): job for job in jobs}
        try:
            for future in as_completed(futures):
                job = futures[future]
                future.result()
                bar.update(task, advance=1, info=f"{job.task} {job.method} {_fmt_value(job.value)} seed {job.seed}")
        except BaseException as e:  # a failed run or Ctrl-C: start nothing more; running runs end with their error
            pool.shutdown(wait=True, cancel_futures=True)
            if not isinstance(e, Exception):
                raise
            raise TetherError(
                f"bench run {job.run_dir} failed ({type(e).__name__}: {e}); its output is in "
                f"{job.run_dir / 'bench.log'}; finished runs are kept: run the command again to resume"
            ) from e
    pool.shutdown()


def _init_worker(log_path: str) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)  # tiny models: a second thread gains little, and the workers share the cores
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    hf_logging.disable_progress_bar()
    _redirect_output(log_path)  # the parent's progress bar owns the terminal


def _redirect_output(path: str) -> int:
    """Point file descriptors 1 and 2 (Python's and C libraries' output) at `path`; returns a copy of the old 2."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return saved


@contextmanager
def _output_to(path: Path) -> Iterator[None]:
    saved_out, saved_err = os.dup(1), _redirect_output(str(path))
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)


def execute(job: Job) -> None:
    """Run one job in this process, output to run_dir/bench.log; drop the saved weights; wall.json last."""
    from tether.config import validate_config
    from tether.run import train

    job.run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with _output_to(job.run_dir / "bench.log"):
        try:
            train(validate_config(job.config), job.run_dir, overwrite=True)
        except BaseException:
            traceback.print_exc()
            raise
    wall = time.perf_counter() - started
    _drop_weights(job.run_dir)
    write_json(job.run_dir / DONE, {"wall_s": round(wall, 2)})


def _drop_weights(path: Path) -> None:
    """The benchmark keeps what it measured, not the models: hundreds of runs would hold gigabytes."""
    for child in path.iterdir():
        if child.is_dir() and child.name.startswith(("model", "checkpoint-")):
            shutil.rmtree(child)
        elif child.suffix == ".safetensors":  # ewc's Fisher
            child.unlink()


def _fmt_value(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _torch_version() -> str:
    import torch

    return torch.__version__
