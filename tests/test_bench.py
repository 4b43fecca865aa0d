"""tether bench: the plan, the aggregation, the best-strength rule, the Pareto front and the pass/fail checks on
made-up numbers; the whole --quick benchmark end to end (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tether.config import validate_config
from tether.harness.bench import analysis, report, tasks


def agg(task: str, method: str, value: float | None, val: float, delta: float, **extra: float) -> dict[str, Any]:
    """An aggregate row as analysis.aggregate makes it, with zero spread."""
    row = {"task": task, "method": method, "knob": tasks.METHOD_BY_NAME[method].knob, "value": value, "seeds": [0]}
    fields = {"val_loss": val, "delta_loss": delta, "recall_drop": 0.5, "overfit_gap": 0.1, "wall_s": 3.0} | extra
    row.update({f: {"mean": fields[f], "std": 0.0} if f in fields else None for f in analysis.FIELDS})
    return row


def line_of(checks: list[analysis.Check], start: str) -> analysis.Check:
    return next(c for c in checks if c.claim.startswith(start))


@pytest.fixture
def fake_base(tmp_path: Path) -> SimpleNamespace:
    (tmp_path / "model").mkdir()
    data = {}
    for name in ("facts", "task_train", "task_val"):
        data[name] = tmp_path / f"{name}.jsonl"
        data[name].write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n"
                                      for i in range(100)))  # fmt: skip
    return SimpleNamespace(model_dir=tmp_path / "model", data=data)


def test_plan_covers_every_method_with_valid_configs(tmp_path: Path, fake_base: SimpleNamespace) -> None:
    jobs = tasks.plan(tmp_path / "out", 3, quick=False, bases=dict.fromkeys(range(3), fake_base))
    assert len({j.run_dir for j in jobs}) == len(jobs)
    for task in tasks.TASKS:
        assert {j.method for j in jobs if j.task == task.name} == set(tasks.METHOD_BY_NAME)
    assert {j.seed for j in jobs} == {0, 1, 2}
    assert len([j for j in jobs if j.method == "wise_ft"]) == 2 * 3  # one run per task and seed: all alphas
    for job in jobs:
        validate_config(job.config)
    small = next(j for j in jobs if j.task == "small-data")
    assert len(Path(small.config["data"]["train"]).read_text().splitlines()) == tasks.TASKS[1].train_rows
    assert small.config["training"]["seed"] == small.seed


def test_quick_plan_is_a_subset_of_the_full_one(tmp_path: Path, fake_base: SimpleNamespace) -> None:
    bases = {0: fake_base}
    full = {(j.task, j.method, j.value) for j in tasks.plan(tmp_path, 1, quick=False, bases=bases)}
    quick = {(j.task, j.method, j.value) for j in tasks.plan(tmp_path, 1, quick=True, bases=bases)}
    assert quick < full
    assert {m for t, m, _ in quick if t == "arithmetic"} == set(tasks.METHOD_BY_NAME)
    assert {v for t, m, v in quick if m == "replay"} == {0.01, 0.05}


def test_aggregate_means_and_sample_spread() -> None:
    points = [
        {"task": "t", "method": "ewc", "knob": "strength", "value": 0.3, "seed": s, "val_loss": v, "delta_loss": d,
         "recall_drop": None, "overfit_gap": 0.1, "wall_s": 2.0}
        for s, v, d in ((0, 1.0, 0.1), (1, 2.0, 0.3), (2, 3.0, 0.2))
    ]  # fmt: skip
    (row,) = analysis.aggregate(points)
    assert row["seeds"] == [0, 1, 2]
    assert row["val_loss"] == pytest.approx({"mean": 2.0, "std": 1.0})
    assert row["delta_loss"]["mean"] == pytest.approx(0.2)
    assert row["recall_drop"] is None and row["base_val_loss"] is None
    assert analysis.stats([4.0]) == {"mean": 4.0, "std": 0.0}


def test_pareto_front_keeps_only_undominated_points() -> None:
    from tether.evaluate import pareto_indices

    points = [(0.0, 3.0), (1.0, 2.0), (1.0, 2.5), (2.0, 2.0), (3.0, 1.0), (0.5, 4.0), (3.0, 1.0)]
    assert pareto_indices(points) == [0, 1, 4, 6]  # equal points do not dominate each other


def test_best_strength_trades_target_against_forgetting() -> None:
    plain = agg("arithmetic", "plain", None, 1.0, 5.0)
    rows = [agg("arithmetic", "l2_sp", s, v, d) for s, v, d in ((3, 0.98, 2.0), (10, 1.04, 0.1), (30, 1.3, 0.0))]
    assert analysis.best_strength(rows, plain, "tradeoff")["value"] == 10  # 30 forgets less but costs 30%
    assert analysis.best_strength(rows, plain, "target")["value"] == 3
    too_costly = [agg("arithmetic", "kl", s, v, 1.0) for s, v in ((1, 1.5), (10, 2.0))]
    assert analysis.best_strength(too_costly, plain, "tradeoff")["value"] == 1


def arithmetic_rows(keeper_val: float, keeper_delta: float, replay_delta: float) -> list[dict[str, Any]]:
    rows = [
        agg("arithmetic", "plain", None, 1.2, 4.0),
        agg("arithmetic", "ewc", 0.3, keeper_val, keeper_delta),
        agg("arithmetic", "replay", 0.01, 1.2, 3.5),
        agg("arithmetic", "replay", 0.05, 1.2, replay_delta),
        agg("arithmetic", "l1", 1e-4, 1.1, 0.0),  # not a keeper: must not count
    ]
    return rows + [agg("arithmetic", "wise_ft", a, v, d, base_val_loss=8.0) for a, v, d in
                   ((0.5, 1.8, 0.3), (0.75, 1.3, 1.5), (1.0, 1.2, 4.0))]  # fmt: skip


def test_keepers_and_replay_checks_pass_and_fail_on_the_numbers() -> None:
    good = analysis.checks(arithmetic_rows(keeper_val=1.25, keeper_delta=1.9, replay_delta=2.0))
    assert line_of(good, "best of").passed  # 52% less forgetting at +4.2% target loss
    assert line_of(good, "replay").passed and "50%" in line_of(good, "replay").detail
    costly = analysis.checks(arithmetic_rows(keeper_val=1.27, keeper_delta=0.0, replay_delta=2.1))
    assert not line_of(costly, "best of").passed  # +5.8% target loss
    assert not line_of(costly, "replay").passed  # 47.5% less
    assert line_of(costly, "best of").line().startswith("FAIL")


def test_forgetting_checks_are_unmeasurable_when_plain_does_not_forget() -> None:
    rows = [agg("arithmetic", "plain", None, 1.2, -0.01), agg("arithmetic", "ewc", 0.3, 1.2, -0.02)]
    result = analysis.check_keepers(rows)
    assert not result.passed and "did not forget" in result.detail
    assert not analysis.check_replay(rows).passed


def test_wise_ft_check_uses_recovered_forgetting_and_kept_gain() -> None:
    rows = arithmetic_rows(1.2, 0.0, 0.0)
    passed = analysis.check_wise_ft(rows)  # alpha 0.5: 92.5% recovered, (8-1.8)/(8-1.2) = 91% kept
    assert passed.passed and passed.detail.startswith("alpha 0.5")
    rows = [r for r in rows if not (r["method"] == "wise_ft" and r["value"] == 0.5)]
    assert analysis.check_wise_ft(rows).passed  # alpha 0.75: 62.5% recovered and 99% kept
    rows = [r for r in rows if not (r["method"] == "wise_ft" and r["value"] == 0.75)]
    assert not analysis.check_wise_ft(rows).passed  # alpha 1 alone: nothing to interpolate


def test_small_data_check_needs_early_stopping_and_a_classic_regularizer() -> None:
    rows = [
        agg("small-data", "plain", None, 3.0, 3.0),
        agg("small-data", "early_stopping", 1, 1.6, 2.0),
        agg("small-data", "weight_decay", 0.1, 3.1, 3.0),
        agg("small-data", "dropout", 0.3, 2.4, 4.0),
    ]
    assert analysis.check_small_data(rows).passed
    rows[3] = agg("small-data", "dropout", 0.3, 3.2, 4.0)
    assert not analysis.check_small_data(rows).passed
    assert not analysis.check_small_data(rows[:1] + rows[2:]).passed  # no early stopping run


def test_budget_check_compares_the_restored_checkpoint_with_the_target_only_choice() -> None:
    def row(restored: float, alone: float, within: float = 1.0, kept: float = 1.0) -> dict[str, Any]:
        extra = {"target_only_val_loss": 1.2, "target_only_delta_loss": alone, "budget_within": within}
        return agg("arithmetic", "forgetting_budget", tasks.BUDGET, 1.7, restored, budget_kept=kept, **extra)

    passed = analysis.check_budget([row(1.4, 5.5)])
    assert passed.passed and "on 1 of 1 seeds" in passed.detail and "(75% less forgetting)" in passed.detail
    assert not analysis.check_budget([row(1.4, 5.5, kept=0.0)]).passed  # an evaluation was within, not restored
    assert not analysis.check_budget([row(2.6, 5.5, within=0.0, kept=0.0)]).passed  # none was within the budget
    assert not analysis.check_budget([row(1.4, 2.5)]).passed  # within, but only 44% less than the target alone's
    assert "not measured" in analysis.check_budget([]).detail


def test_budget_runs_are_evaluated_every_20_steps(tmp_path: Path, fake_base: SimpleNamespace) -> None:
    jobs = [j for j in tasks.plan(tmp_path, 1, quick=True, bases={0: fake_base}) if j.method == "forgetting_budget"]
    (job,) = jobs  # arithmetic only in --quick
    cfg = validate_config(job.config)
    assert cfg.training["eval_steps"] == 20 and cfg.training["max_steps"] == 200  # merged into the task's training
    assert cfg.early_stopping.forgetting_budget == tasks.BUDGET and cfg.evaluation.reference_holdout == 0.5
    alone = {"step": 200, "eval_loss": 1.2, "forgetting": 5.5}
    metrics = {"target": {"val_loss": 1.7}, "overfit_gap": 0.1, "forgetting": {"delta_loss": 2.6},
               "forgetting_budget": {"target_only": alone, "within": 0, "limit": 2.0}}  # fmt: skip
    (point,) = analysis.points_of(job, metrics, 3.0)
    assert point["target_only_val_loss"] == 1.2 and point["target_only_delta_loss"] == 5.5
    assert point["budget_within"] == point["budget_kept"] == 0.0


def test_points_of_reads_the_measured_model_of_each_method(tmp_path: Path) -> None:
    def measured(val: float) -> dict[str, Any]:
        return {"target": {"val_loss": val}, "overfit_gap": 0.2,
                "forgetting": {"delta_loss": val / 10, "recall_drop": 0.5, "recall_before": 0.9}}  # fmt: skip

    job = tasks.Job("arithmetic", "ema", 0.9, 1, tmp_path, {})
    (point,) = analysis.points_of(job, measured(2.0) | {"ema": measured(1.5)}, 4.0)
    assert point["val_loss"] == 1.5 and point["seed"] == 1 and point["wall_s"] == 4.0
    alphas = [{"alpha": a, "val_loss": 8 - 6 * a, "delta_loss": 4 * a, "recall": 0.9 - 0.8 * a} for a in (0, 0.5, 1)]
    job = tasks.Job("arithmetic", "wise_ft", None, 0, tmp_path, {})
    points = analysis.points_of(job, measured(2.0) | {"wise_ft": {"alphas": alphas}}, 4.0)
    assert [p["value"] for p in points] == [0.5, 1]
    assert points[0]["base_val_loss"] == 8 and points[0]["recall_drop"] == pytest.approx(0.4)


def test_outputs_render_from_aggregates(tmp_path: Path) -> None:
    rows = [*arithmetic_rows(1.25, 1.9, 2.0), agg("small-data", "plain", None, 3.0, 3.0)]
    result = {"command": "tether bench", "machine": "test", "summary": "made up", "aggregates": rows, "runs": []}
    result["checks"] = [asdict(c) | {"line": c.line()} for c in analysis.checks(rows)]
    report.write_outputs(result, tmp_path)
    md = (tmp_path / "bench.md").read_text()
    assert "| ewc | strength 0.3 | 1.250 ± 0.000 | +1.900 ± 0.000 |" in md
    assert md.count("FAIL") == 3 and md.count("PASS") == 3  # no small-data early stopping row, budget or merge run
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "PASS" in (tmp_path / "bench.html").read_text()
    assert json.loads((tmp_path / "bench.json").read_text())["aggregates"][0]["method"] == "plain"


def test_table_cells_format_means_with_spread() -> None:
    row = agg("arithmetic", "ewc", 0.3, 1.23456, 0.0004, recall_drop=-0.001)
    row["val_loss"]["std"] = 0.05
    assert report.table_cells(row)[1:5] == ["strength 0.3", "1.235 ± 0.050", "0.000 ± 0.000", "0 ± 0"]
    assert report.table_cells(agg("arithmetic", "plain", None, 1.0, 4.5))[1:4] == [
        "-",
        "1.000 ± 0.000",
        "+4.500 ± 0.000",
    ]


@pytest.mark.slow
def test_quick_bench_end_to_end_and_resume(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "tether", "bench", "--quick", "--seeds", "1", "--output-dir", str(tmp_path)]
    env = os.environ | {"COLUMNS": "200"}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    methods = {r["method"] for r in result["aggregates"] if r["task"] == "arithmetic"}
    assert methods == set(tasks.METHOD_BY_NAME)
    verdicts = [line.split()[0] for line in first.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(verdicts) == 6  # the README's six checks, merge's included
    assert verdicts == ["PASS" if c["passed"] else "FAIL" for c in result["checks"]]
    for row in result["runs"]:
        assert row["val_loss"] > 0 and row["wall_s"] > 0
        assert not any(Path(row["run_dir"]).glob("model*"))  # weights are dropped, measures kept
    assert (tmp_path / "pareto.png").stat().st_size > 10_000
    marks = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/**/wall.json")}
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{len(marks)} already finished" in second.stdout
    assert marks == {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/**/wall.json")}


def test_merge_check_compares_the_best_candidates_in_the_band(tmp_path: Path) -> None:
    """Per seed: the forgetting WiSE-FT's best global alpha and merge's best candidate recover among the candidates
    within 5% of the best target loss; the check passes when merge's mean is higher."""

    def candidate(name: str, method: str, val: float, delta: float) -> dict:
        return {"candidate": name, "method": method, "val_loss": val, "delta_loss": delta}

    rows = [candidate("global 1", "global", 1.00, 4.0), candidate("global 0.9", "global", 1.04, 2.0),
            candidate("global 0.5", "global", 1.50, 0.5), candidate("layers a", "layers", 1.03, 1.0),
            candidate("dare 0.9", "dare", 1.20, 0.1)]  # fmt: skip
    job = tasks.Job("arithmetic", "merge", None, 0, tmp_path, {})
    (point,) = analysis.points_of(job, {"merge": {"candidates": rows}}, 1.0)
    assert point["wise_recovered"] == pytest.approx(0.5) and point["merge_recovered"] == pytest.approx(0.75)
    assert (point["val_loss"], point["delta_loss"]) == (1.03, 1.0)  # dare and global 0.5 are outside the band
    (row,) = analysis.aggregate([point])
    check = analysis.check_merge([row])
    assert check.passed and check.detail.startswith("75% vs 50%")
    worse = analysis.aggregate([point | {"merge_recovered": 0.5}])
    assert not analysis.check_merge(worse).passed
