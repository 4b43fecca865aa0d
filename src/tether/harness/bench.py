"""`tether bench`: does regularization measurably prevent forgetting and overfitting? Measured, on the demo's world.

Tasks (tether.synthetic: seed s generates a world of invented facts and pre-trains a tiny Llama on them; the facts
are every run's reference data, what must not be forgotten):
  arithmetic   the demo's fine-tune: 500 addition rows, 100 held-out rows, 200 steps at lr 1.5e-3. Plain
               fine-tuning learns the task and forgets the facts.
  small-data   the same task from its first 64 training rows for 300 steps (75 epochs): plain training run to
               the end overfits (the validation loss is lowest after ~40 steps and then climbs).
Every method of METHODS runs on both tasks at each strength of its grid for each seed; seed s is the world, the
pre-trained base and the training seed. --quick runs each method once (replay at 1% and 5%) on arithmetic and only
what check 4 needs on small-data. Each run is tether.run.train in its own directory, in worker processes with one
torch thread each; the runs keep their measures and logs, not their weights. wall.json, written last, marks a
finished run: running the command again skips finished runs (resume), so delete the output directory to measure
afresh.

Measures of each run, then mean and sample standard deviation over seeds (ratios below are ratios of the means):
  target loss   target.val_loss: token-weighted cross-entropy on the held-out rows
  forgetting    forgetting.delta_loss: the facts' loss after minus before; recall drop: share of facts no
                longer completed exactly (greedy) = recall before - recall after
  overfit gap   target val loss - target train loss
  wall time     seconds per run in its worker: load, measure before, setup (Fisher), train, measure after
The measured model is the final one (early stopping: the restored best checkpoint); for ema the average
(model_ema/); for wise_ft each alpha's interpolation (one run per seed gives every alpha; alpha 0 is the base
model, whose target loss is T_base below, and has no point of its own).

Checks, printed PASS/FAIL, computed from the measured means (F: forgetting, T: target loss):
  1  the best of l2_sp, ewc, distill (KD), replay on arithmetic: some strength has 1 - F/F_plain >= 50% at
     T/T_plain - 1 <= 5%
  2  replay at ratio 0.05 on arithmetic: 1 - F/F_plain >= 50%
  3  wise_ft on arithmetic: some alpha < 1 with 1 - F(alpha)/F(1) >= 50% (forgetting recovered) and
     (T_base - T(alpha)) / (T_base - T(1)) >= 90% (target gain kept)
  4  small-data: early stopping and the best of weight_decay / dropout / label_smoothing (each at its best
     strength) have a lower T than plain training run to the end
Best strength of a method: on arithmetic the least forgetting among its strengths within 5% of plain's T (none
within: the lowest T); on small-data the lowest T. Both choices look at the validation data, as early stopping does.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tether.errors import ConfigError, TetherError
from tether.evaluate import pareto_indices
from tether.outputs import save_png, write_json, write_text_atomic
from tether.selection import within_tolerance

TARGET_COST = 0.05  # check 1 and the arithmetic best-strength rule: at most 5% more target loss than plain
FORGET_CUT = 0.5  # checks 1-3: at least half the forgetting removed
GAIN_KEPT = 0.9  # check 3: at least 90% of the target gain kept
WISE_ALPHAS = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)
KEEPERS = ("l2_sp", "ewc", "distill", "replay")  # check 1
SMALL_DATA_REGULARIZERS = ("weight_decay", "dropout", "label_smoothing")  # check 4
DONE = "wall.json"  # written last in a run directory: the run is finished
FIELDS = ("val_loss", "delta_loss", "recall_drop", "overfit_gap", "wall_s", "base_val_loss")


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    train_rows: int | None
    """The first rows of the world's task_train (None: all 500)."""
    max_steps: int
    eval_steps: int
    best_by: str
    """How a method's best strength is chosen: "tradeoff" (least forgetting within 5% target cost) or "target"."""
    quick_methods: tuple[str, ...] | None = None
    """--quick runs only these methods on this task (None: all)."""


TASKS = (
    Task(
        name="arithmetic", title="learn addition (500 rows, 200 steps), keep the facts",
        train_rows=None, max_steps=200, eval_steps=40, best_by="tradeoff",
    ),
    Task(
        name="small-data", title="addition from 64 rows, 300 steps: plain training overfits",
        train_rows=64, max_steps=300, eval_steps=20, best_by="target",
        quick_methods=("plain", "early_stopping", *SMALL_DATA_REGULARIZERS),  # what check 4 needs
    ),
)  # fmt: skip


def _reg(name: str, knob: str = "strength") -> Callable[[float], dict[str, Any]]:
    return lambda value: {"regularizers": [{"name": name, knob: value}]}


@dataclass(frozen=True)
class Method:
    name: str
    knob: str
    """What a grid value sets ("strength", "ratio", "r", ...)."""
    grid: tuple[float, ...]
    quick: tuple[float, ...]
    """The values --quick runs."""
    patch: Callable[[float], dict[str, Any]]
    """The config sections a grid value sets (regularizers, lora or early_stopping)."""
    one_run: bool = False
    """One run per seed measures every grid value (wise_ft's alphas)."""

    def run_values(self, quick: bool) -> tuple[float | None, ...]:
        if self.one_run or not self.grid:
            return (None,)
        return self.quick if quick else self.grid


# Each grid spans the README's typical range for the method plus a weaker or stronger setting beyond it.
METHODS = (
    Method("plain", "-", (), (), lambda _: {}),
    Method("weight_decay", "strength", (0.01, 0.1, 1.0), (0.1,), _reg("weight_decay")),
    Method("l1", "strength", (1e-5, 1e-4, 1e-3), (1e-4,), _reg("l1")),
    Method("l2_sp", "strength", (3.0, 10.0, 30.0), (10.0,), _reg("l2_sp")),
    Method("ewc", "strength", (0.1, 0.3, 1.0), (0.3,), _reg("ewc")),
    Method("si", "strength", (0.1, 0.3, 1.0), (0.3,), _reg("si")),
    Method("distill", "strength", (0.5, 2.0, 8.0), (2.0,), _reg("distill")),
    Method("kl", "strength", (0.03, 0.1, 1.0), (0.1,), _reg("kl")),
    Method("replay", "ratio", (0.01, 0.05, 0.25), (0.01, 0.05), _reg("replay", "ratio")),
    Method("label_smoothing", "strength", (0.05, 0.1, 0.2), (0.1,), _reg("label_smoothing")),
    Method("dropout", "attention", (0.05, 0.1, 0.3), (0.1,), _reg("dropout", "attention")),
    Method("neftune", "strength", (1.0, 5.0, 15.0), (5.0,), _reg("neftune")),
    Method("llrd", "decay", (0.5, 0.8, 0.95), (0.8,), _reg("llrd", "decay")),
    Method("lora", "r", (4, 16, 64), (16,), lambda r: {"lora": {"r": int(r), "alpha": 2 * r}}),  # alpha/r fixed
    Method("ema", "decay", (0.9, 0.97, 0.99), (0.97,), _reg("ema", "decay")),
    Method("early_stopping", "patience", (1, 3), (3,), lambda p: {"early_stopping": {"patience": int(p)}}),
    Method(
        "wise_ft",
        "alpha",
        WISE_ALPHAS[1:],
        WISE_ALPHAS[1:],
        lambda _: {"regularizers": [{"name": "wise_ft", "alphas": list(WISE_ALPHAS)}]},
        one_run=True,
    ),
)
METHOD_BY_NAME = {m.name: m for m in METHODS}


@dataclass(frozen=True)
class Job:
    """One run: what it measures and its complete config."""

    task: str
    method: str
    value: float | None
    seed: int
    run_dir: Path
    config: dict[str, Any]


# ---------------------------------------------------------------------------------------------------------------
# Planning and running


def plan(output_dir: Path, seeds: int, quick: bool, bases: dict[int, Any]) -> list[Job]:
    """Every run of the benchmark, seed by seed."""
    jobs = []
    for seed in range(seeds):
        for task in TASKS:
            train_file = task_train_file(output_dir, bases[seed], task, seed)
            for method in METHODS:
                if quick and task.quick_methods is not None and method.name not in task.quick_methods:
                    continue
                for value in method.run_values(quick):
                    where = run_dir(output_dir, task, method, value, seed)
                    config = run_config(bases[seed], task, train_file, method, value, seed)
                    jobs.append(Job(task.name, method.name, value, seed, where, config))
    return jobs


def run_dir(output_dir: Path, task: Task, method: Method, value: float | None, seed: int) -> Path:
    strength = "" if value is None else f"{method.knob}-{value:g}"
    return output_dir / "runs" / task.name / method.name / strength / f"seed-{seed}"


def task_train_file(output_dir: Path, base: Any, task: Task, seed: int) -> Path:
    """The task's training rows: the world's task_train, or its first `train_rows` rows written under output_dir."""
    if task.train_rows is None:
        return base.data["task_train"]
    path = output_dir / "data" / f"seed-{seed}" / f"{task.name}_train.jsonl"
    lines = base.data["task_train"].read_text(encoding="utf-8").splitlines(keepends=True)
    write_text_atomic(path, "".join(lines[: task.train_rows]))
    return path


def run_config(base: Any, task: Task, train_file: Path, method: Method, value: float | None, seed: int) -> dict:
    """The demo's run config (tether.harness.demo.demo_config) for this task, seed and method at `value`."""
    from tether.harness.demo import demo_config

    raw = demo_config(base, [])
    raw["data"].update(train=str(train_file), seed=seed)
    raw["training"].update(max_steps=task.max_steps, eval_steps=task.eval_steps, save_strategy="no", seed=seed)
    raw.update(method.patch(value))
    return raw


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


# ---------------------------------------------------------------------------------------------------------------
# Measures, aggregates, checks


def points_of(job: Job, metrics: dict[str, Any], wall_s: float) -> list[dict[str, Any]]:
    """The measured points of one finished run: one, or one per alpha > 0 for wise_ft."""
    common = {"task": job.task, "method": job.method, "knob": METHOD_BY_NAME[job.method].knob, "seed": job.seed}
    common.update(wall_s=wall_s, run_dir=str(job.run_dir), global_step=metrics.get("global_step"))
    if job.method == "wise_ft":
        rows = {r["alpha"]: r for r in metrics["wise_ft"]["alphas"]}
        before = metrics["forgetting"].get("recall_before")
        common.update(overfit_gap=None, base_val_loss=rows[0.0]["val_loss"])  # alpha 0 is the base model
        return [
            common | {
                "value": alpha, "val_loss": row["val_loss"], "delta_loss": row["delta_loss"],
                "recall_drop": None if before is None else before - row["recall"],
            }
            for alpha, row in rows.items() if alpha > 0
        ]  # fmt: skip
    measured = metrics["ema"] if job.method == "ema" else metrics
    forgetting = measured["forgetting"]
    return [
        common | {
            "value": job.value, "val_loss": measured["target"]["val_loss"], "delta_loss": forgetting["delta_loss"],
            "recall_drop": forgetting.get("recall_drop"), "overfit_gap": measured["overfit_gap"],
        }
    ]  # fmt: skip


def stats(values: list[float]) -> dict[str, float] | None:
    """Mean and sample standard deviation (0 for one value); None for no values."""
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def aggregate(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, method, value), in the order first seen: each field's stats over the seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault((p["task"], p["method"], p["value"]), []).append(p)
    rows = []
    for group in groups.values():
        row = {k: group[0][k] for k in ("task", "method", "knob", "value")}
        row["seeds"] = sorted(p["seed"] for p in group)
        row.update({f: stats([p[f] for p in group if p.get(f) is not None]) for f in FIELDS})
        rows.append(row)
    return rows


def mean(row: dict[str, Any], field: str) -> float:
    return row[field]["mean"]


def select(rows: list[dict[str, Any]], task: str, method: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["task"] == task and r["method"] == method]


def best_strength(rows: list[dict[str, Any]], plain: dict[str, Any], by: str) -> dict[str, Any]:
    """The best of one method's rows: least forgetting within TARGET_COST of plain's target loss ("tradeoff"; none
    within: lowest target loss), or lowest target loss ("target")."""
    lowest_target = min(rows, key=lambda r: mean(r, "val_loss"))
    if by == "target":
        return lowest_target
    within = within_tolerance(rows, lambda r: mean(r, "val_loss"), TARGET_COST, reference=mean(plain, "val_loss"))
    return min(within, key=lambda r: mean(r, "delta_loss")) if within else lowest_target


def best_per_method(rows: list[dict[str, Any]], task: Task) -> list[dict[str, Any]]:
    plain = select(rows, task.name, "plain")[0]
    found = [select(rows, task.name, m.name) for m in METHODS]
    return [best_strength(r, plain, task.best_by) for r in found if r]


@dataclass(frozen=True)
class Check:
    claim: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.claim}: {self.detail}"


def forgetting_cut(row: dict[str, Any], reference: dict[str, Any]) -> float:
    """1 - F/F_reference: the share of the reference's forgetting (facts' loss increase) that `row` avoids."""
    return 1 - mean(row, "delta_loss") / mean(reference, "delta_loss")


def target_cost(row: dict[str, Any], plain: dict[str, Any]) -> float:
    return mean(row, "val_loss") / mean(plain, "val_loss") - 1


def check_keepers(rows: list[dict[str, Any]]) -> Check:
    claim = "best of L2-SP / EWC / KD / replay: >= 50% less forgetting at <= 5% target-loss cost"
    plain = select(rows, "arithmetic", "plain")
    candidates = [r for m in KEEPERS for r in select(rows, "arithmetic", m)]
    if not plain or not candidates or mean(plain[0], "delta_loss") <= 0:
        return Check(claim, False, _unmeasurable(plain, candidates))
    scored = [(forgetting_cut(r, plain[0]), target_cost(r, plain[0]), r) for r in candidates]
    passing = [s for s in scored if s[0] >= FORGET_CUT and s[1] <= TARGET_COST]
    affordable = [s for s in scored if s[1] <= TARGET_COST]
    cut, cost, best = max(passing or affordable or scored, key=lambda s: s[0])
    return Check(claim, bool(passing), f"{_name(best)} {_cut_text(cut, best, plain[0])}, target loss {cost:+.1%}")


def check_replay(rows: list[dict[str, Any]]) -> Check:
    claim = "replay at 5% cuts forgetting by >= 50%"
    plain = select(rows, "arithmetic", "plain")
    replay = [r for r in select(rows, "arithmetic", "replay") if r["value"] == 0.05]
    if not plain or not replay or mean(plain[0], "delta_loss") <= 0:
        return Check(claim, False, _unmeasurable(plain, replay))
    cut = forgetting_cut(replay[0], plain[0])
    detail = f"{_cut_text(cut, replay[0], plain[0])}, target loss {target_cost(replay[0], plain[0]):+.1%}"
    return Check(claim, cut >= FORGET_CUT, detail)


def check_wise_ft(rows: list[dict[str, Any]]) -> Check:
    claim = "a WiSE-FT alpha recovers >= 50% of the forgetting and keeps >= 90% of the target gain"
    by_alpha = {r["value"]: r for r in select(rows, "arithmetic", "wise_ft")}
    full = by_alpha.pop(1.0, None)
    if full is None or not by_alpha or mean(full, "delta_loss") <= 0:
        return Check(claim, False, "not measurable: no wise_ft run at alpha 1 that forgot, or no alpha below 1")
    base = mean(full, "base_val_loss")
    gain = base - mean(full, "val_loss")
    if gain <= 0:
        return Check(claim, False, f"not measurable: fine-tuning did not lower the target loss (base {base:.3f})")
    scored = [(forgetting_cut(r, full), (base - mean(r, "val_loss")) / gain, r) for r in by_alpha.values()]
    passing = [s for s in scored if s[0] >= FORGET_CUT and s[1] >= GAIN_KEPT]
    # Without a passing alpha, show the one closest to both thresholds.
    recovered, kept, best = max(passing, key=lambda s: s[0]) if passing else max(
        scored, key=lambda s: min(s[0] / FORGET_CUT, s[1] / GAIN_KEPT)
    )  # fmt: skip
    detail = (
        f"alpha {best['value']:g} recovers {recovered:.0%} of the forgetting (facts' loss "
        f"+{mean(best, 'delta_loss'):.3f} vs +{mean(full, 'delta_loss'):.3f} at alpha 1) and keeps {kept:.0%} of the "
        f"target gain (val loss {mean(best, 'val_loss'):.3f}; base {base:.3f}, alpha 1 {mean(full, 'val_loss'):.3f})"
    )
    return Check(claim, bool(passing), detail)


def check_small_data(rows: list[dict[str, Any]]) -> Check:
    claim = "small data: early stopping and one of weight decay / dropout / label smoothing beat plain run to the end"
    plain = select(rows, "small-data", "plain")
    stopping = select(rows, "small-data", "early_stopping")
    others = [r for m in SMALL_DATA_REGULARIZERS for r in select(rows, "small-data", m)]
    if not plain or not stopping or not others:
        return Check(claim, False, "not measured (a method of this check has no finished run)")
    target = mean(plain[0], "val_loss")
    best_stop = best_strength(stopping, plain[0], "target")
    best_other = best_strength(others, plain[0], "target")
    passed = mean(best_stop, "val_loss") < target and mean(best_other, "val_loss") < target
    detail = f"val loss {_pm(best_stop, 'val_loss')} ({_name(best_stop)}), {_pm(best_other, 'val_loss')} "
    detail += f"({_name(best_other)}) vs {_pm(plain[0], 'val_loss')} (plain)"
    return Check(claim, passed, detail)


def checks(rows: list[dict[str, Any]]) -> list[Check]:
    return [check_keepers(rows), check_replay(rows), check_wise_ft(rows), check_small_data(rows)]


def _unmeasurable(plain: list[dict[str, Any]], others: list[dict[str, Any]]) -> str:
    if not plain or not others:
        return "not measured (a method of this check has no finished run)"
    return f"not measurable: plain fine-tuning did not forget (facts' loss {mean(plain[0], 'delta_loss'):+.3f})"


def _cut_text(cut: float, row: dict[str, Any], reference: dict[str, Any]) -> str:
    return (
        f"cuts forgetting by {cut:.0%} (facts' loss +{mean(row, 'delta_loss'):.3f} vs "
        f"+{mean(reference, 'delta_loss'):.3f} plain)"
    )


# ---------------------------------------------------------------------------------------------------------------
# Tables, plot, files


def _fmt_value(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _name(row: dict[str, Any]) -> str:
    return row["method"] if row["value"] is None else f"{row['method']} {row['knob']} {row['value']:g}"


def _pm(row: dict[str, Any], field: str, fmt: str = ".3f", scale: float = 1.0, sign: str = "") -> str:
    s = row[field]
    if s is None:
        return "-"
    text = f"{s['mean'] * scale:{sign}{fmt}}"
    if float(text) == 0:  # "-0" or "+0.000": a mean that rounds to zero has no sign
        text = text.lstrip("+-")
    return f"{text} ± {s['std'] * scale:{fmt}}"


COLUMNS = ("method", "strength", "target loss", "facts' loss +", "recall drop %", "overfit gap", "s/run")


def table_cells(row: dict[str, Any]) -> list[str]:
    strength = "-" if row["value"] is None else f"{row['knob']} {row['value']:g}"
    return [
        row["method"], strength, _pm(row, "val_loss"), _pm(row, "delta_loss", sign="+"),
        _pm(row, "recall_drop", ".0f", 100), _pm(row, "overfit_gap"), f"{mean(row, 'wall_s'):.1f}",
    ]  # fmt: skip


def markdown_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    return lines + ["| " + " | ".join(table_cells(r)) + " |" for r in rows]


def markdown(result: dict[str, Any]) -> str:
    """bench.md: how it was run, the checks, the best strength per method and every strength, per task."""
    rows = result["aggregates"]
    out = ["# tether bench", "", f"`{result['command']}` on {result['machine']}: {result['summary']}", ""]
    out += ["## Checks", "", *(f"- {c['line']}" for c in result["checks"]), ""]
    for task in TASKS:
        rule = (
            "least forgetting within 5% of plain's target loss" if task.best_by == "tradeoff" else "lowest target loss"
        )
        out += [f"## {task.name}: {task.title}", "", f"Best strength per method ({rule}), mean ± sd over seeds:", ""]
        out += [*markdown_table(best_per_method(rows, task)), ""]
    for task in TASKS:
        out += [
            f"## {task.name}: every strength",
            "",
            *markdown_table([r for r in rows if r["task"] == task.name]),
            "",
        ]
    return "\n".join(out)


def rich_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("method", "strength") else "right")
    for row in rows:
        table.add_row(*table_cells(row))
    return table


def plot_pareto(rows: list[dict[str, Any]], path: Path) -> None:
    """pareto.png: per task, target val loss against forgetting, one series per method over its strengths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(15, 6))
    for ax, task in zip(axes, TASKS):
        _pareto_axes(ax, [r for r in rows if r["task"] == task.name], task)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    save_png(fig, path)


def _pareto_axes(ax: Any, rows: list[dict[str, Any]], task: Task) -> None:
    import matplotlib.pyplot as plt

    tab20 = plt.get_cmap("tab20").colors
    colors, markers = tab20[0::2] + tab20[1::2], "osD^v<>pPXh"  # ten distinct hues first, then their light tints
    for i, method in enumerate(METHODS):
        series = sorted((r for r in rows if r["method"] == method.name), key=lambda r: r["value"] or 0)
        xs, ys = [mean(r, "delta_loss") for r in series], [mean(r, "val_loss") for r in series]
        if method.name == "plain":
            ax.scatter(xs, ys, marker="*", s=300, color="black", zorder=5, label="plain (marked)")
        elif series:
            ax.plot(xs, ys, marker=markers[i % len(markers)], color=colors[i % len(colors)], lw=1, ms=5,
                    label=method.name)  # fmt: skip
    points = [(mean(r, "delta_loss"), mean(r, "val_loss")) for r in rows]
    front = sorted(points[i] for i in pareto_indices(points))  # by forgetting, for the step line
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", ls="--", color="grey", label="Pareto front")
    ax.set_xscale("symlog", linthresh=0.01)  # most keepers sit near 0, plain near 5
    ax.set_xlabel("forgetting: facts' loss increase (mean over seeds)")
    ax.set_ylabel("target validation loss (mean over seeds)")
    ax.set_title(f"{task.name}: {task.title}", fontsize=10)
    ax.grid(alpha=0.3)


def write_html(result: dict[str, Any], path: Path) -> None:
    """bench.html: the checks, the plot and the tables as one self-contained page (tether.report.html)."""
    import html

    from tether.report.html import page, png_tag

    png = png_tag(path.with_name("pareto.png"), "Pareto plot")
    checks_html = "<ul>" + "".join(f"<li>{html.escape(c['line'])}</li>" for c in result["checks"]) + "</ul>"
    sections = [("Checks", f"<p>{html.escape(result['command'])}: {html.escape(result['summary'])}</p>{checks_html}")]
    sections.append(("Trade-off", png))
    for task in TASKS:
        best = best_per_method(result["aggregates"], task)
        sections.append((f"{task.name}: {task.title}", _html_table(best)))
    write_text_atomic(path, page("tether bench", sections))


def _html_table(rows: list[dict[str, Any]]) -> str:
    from tether.report.html import table_tag

    return table_tag([dict(zip(COLUMNS, table_cells(r))) for r in rows], list(COLUMNS))


# ---------------------------------------------------------------------------------------------------------------
# The command


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


def write_outputs(result: dict[str, Any], output_dir: Path) -> None:
    write_json(output_dir / "bench.json", result)
    write_text_atomic(output_dir / "bench.md", markdown(result))
    plot_pareto(result["aggregates"], output_dir / "pareto.png")
    write_html(result, output_dir / "bench.html")


def show(result: dict[str, Any], console: Console) -> None:
    for task in TASKS:
        console.print(rich_table(best_per_method(result["aggregates"], task), f"{task.name}: {task.title}"))
    for check in result["checks"]:
        style = "green" if check["passed"] else "red"
        console.print(f"[{style}]{check['line']}[/]", highlight=False, soft_wrap=True)  # one line each: greppable
    console.print(f"{result['summary']}; wrote bench.json, bench.md, pareto.png, bench.html", highlight=False)


def _torch_version() -> str:
    import torch

    return torch.__version__
