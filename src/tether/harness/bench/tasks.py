"""What the benchmark runs: its two tasks, the methods with their grids, and one job per task, method, value and
seed, each a complete run config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.outputs import write_text_atomic

WISE_ALPHAS = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)
MERGE_ALPHAS = (0.0, 0.5, 0.75, 0.85, 0.9, 0.95, 1.0)  # finer near 1, so WiSE-FT has candidates in merge's band
MERGE_TOLERANCE = 0.05  # check 6: the band of target loss (merge's own default)
SMALL_DATA_REGULARIZERS = ("weight_decay", "dropout", "label_smoothing")  # check 4
BUDGET = 2.0  # check 5: the forgetting budget (facts' loss increase, nats) of the retention-aware choice


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
    """The config sections a grid value sets (regularizers, lora, osf or early_stopping; `training` keys are
    merged)."""
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
    Method("self_replay", "ratio", (0.05, 0.1, 0.25), (0.1,), _reg("self_replay", "ratio")),
    Method("label_smoothing", "strength", (0.05, 0.1, 0.2), (0.1,), _reg("label_smoothing")),
    Method("dropout", "attention", (0.05, 0.1, 0.3), (0.1,), _reg("dropout", "attention")),
    Method("neftune", "alpha", (1.0, 5.0, 15.0), (5.0,), _reg("neftune", "alpha")),
    Method("llrd", "decay", (0.5, 0.8, 0.95), (0.8,), _reg("llrd", "decay")),
    Method("lora", "r", (4, 16, 64), (16,), lambda r: {"lora": {"r": int(r), "alpha": 2 * r}}),  # alpha/r fixed
    # the lora rows' grid, from CorDA's knowledge-preserved start (calibrated on the held-out facts)
    Method(
        "lora_corda_kpm",
        "r",
        (4, 16, 64),
        (16,),
        lambda r: {"lora": {"r": int(r), "alpha": 2 * r, "init": "corda_kpm"}},
    ),
    # PEFT's OSF: the top effective_rank singular directions of every linear weight frozen, the rest trained
    Method("osf", "effective_rank", (0.25, 0.5, 0.75), (0.5,), lambda r: {"osf": {"effective_rank": r}}),
    Method("mofo", "fraction", (0.05, 0.1, 0.2), (0.05,), _reg("mofo", "fraction")),
    Method("dft", "strength", (0.5, 1.0), (0.5,), _reg("dft")),
    Method("eaft", "strength", (0.5, 1.0), (0.5,), _reg("eaft")),
    Method("flow", "strength", (0.5, 1.0), (1.0,), _reg("flow")),
    Method("asft", "anchor", (0.1, 0.3), (0.1,), _reg("asft", "anchor")),
    # the lora rows' r 16 run, measured after PEFT's intruder-dimension reduction (its second final model)
    Method(
        "intruder",
        "mitigation",
        (0.25, 0.5, 0.75),
        (0.5,),
        lambda m: {"lora": {"r": 16, "alpha": 32}, "regularizers": [{"name": "intruder", "mitigation": m}]},
    ),
    Method("ema", "decay", (0.9, 0.97, 0.99), (0.97,), _reg("ema", "decay")),
    Method("early_stopping", "patience", (1, 3), (3,), lambda p: {"early_stopping": {"patience": int(p)}}),
    # The choice on target and retention (check 5): the best validation loss among evaluations whose facts' loss rose
    # by at most the budget. Evaluated every 20 steps (plain fine-tuning forgets within the first 40), never stopped
    # early, so the same run's history also shows what the target alone would have chosen.
    Method(
        "forgetting_budget",
        "budget",
        (0.5, 1.0, 2.0),
        (BUDGET,),
        lambda b: {
            "early_stopping": {"patience": 100, "forgetting_budget": b},
            "training": {"eval_steps": 20},
        },
    ),
    # check 6: merge's candidates (global alpha = WiSE-FT, per layer, DARE, TIES, Fisher with ewc at strength 0,
    # which only estimates the Fisher) from one run per seed
    Method(
        "merge",
        "-",
        (),
        (),
        lambda _: {
            "regularizers": [
                {"name": "ewc", "strength": 0.0},
                {"name": "merge", "alphas": list(MERGE_ALPHAS), "tolerance": MERGE_TOLERANCE},
            ]
        },
        one_run=True,
    ),
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
    raw["training"].update(max_steps=task.max_steps, eval_steps=task.eval_steps, seed=seed)
    patch = method.patch(value)
    if "early_stopping" not in patch:  # early stopping saves at every evaluation, to restore the best one
        raw["training"]["save_strategy"] = "no"
    raw["training"].update(patch.pop("training", {}))
    raw.update(patch)
    return raw
