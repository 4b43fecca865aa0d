"""tether sweep: parallel workers on one storage, kill and resume, the Pareto front, the chosen model."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tether.config import SweepConfig, validate_config
from tether.errors import ConfigError, TetherError
from tether.harness.sweep.objective import PruneOnEvaluate, _surplus, candidates
from tether.harness.sweep.run import run_sweep
from tether.harness.sweep.study import Job, masked, open_study
from tether.harness.sweep.summary import choose, non_dominated

OBJECTIVES = ["target.val_loss", "forgetting.delta_loss"]


@pytest.fixture
def sweep_raw(raw_config: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(raw_config)
    raw["training"].update(max_steps=10, eval_steps=5, save_steps=5, learning_rate=3e-3)
    raw["regularizers"] = [{"name": "l2_sp", "strength": 1.0}, {"name": "ema", "decay": 0.8}]  # ema: a candidate
    raw["sweep"] = {
        "trials": 4,
        "params": {
            "regularizers.0.strength": {"distribution": "log_uniform", "low": 0.1, "high": 100.0},
            "training.learning_rate": {"distribution": "log_uniform", "low": 1e-3, "high": 1e-2},
        },
    }
    return raw


def _dominates(a: list[float], b: list[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and a != b


def _metrics(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    return json.loads((Path(trial.user_attrs["run_dir"]) / "metrics.json").read_text())


@pytest.mark.multiprocess
def test_two_workers_on_sqlite_complete_the_trials_and_find_a_non_dominated_front(sweep_raw, tmp_path):
    out = tmp_path / "sweep"
    summary = run_sweep(validate_config(sweep_raw), out, study_name="s", workers=2)

    study = optuna.load_study(study_name="s", storage=f"sqlite:///{out / 'sweep.db'}")
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 4
    others = [t for t in study.get_trials() if t.state != TrialState.COMPLETE]
    assert all(t.state == TrialState.FAIL and t.user_attrs.get("surplus") for t in others)  # only never-run ones
    assert len({t.user_attrs["run_dir"] for t in complete}) == 4
    assert all(int(t.user_attrs["worker"].rsplit(":", 1)[1]) != os.getpid() for t in complete)  # worker processes
    for t in complete:  # the storage holds what each run measured
        m = _metrics(t)
        assert t.values == [m["target"]["val_loss"], m["forgetting"]["delta_loss"]]
        assert {c["model"] for c in t.user_attrs["candidates"]} >= {"model", "model_ema"}

    front = study.best_trials
    assert front
    for t in front:
        assert not any(_dominates(o.values, t.values) for o in complete)
    for t in complete:
        if t not in front:
            assert any(_dominates(f.values, t.values) for f in front)

    saved = json.loads((out / "sweep.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["pareto_front"] == sorted(t.number for t in front)
    assert sorted(t["number"] for t in saved["trials"] if t["state"] == "COMPLETE") == sorted(
        t.number for t in complete
    )
    pool = [c["metrics"] for t in complete for c in t.user_attrs["candidates"]]
    for c in saved["candidate_front"]:
        key = [c["values"][m] for m in OBJECTIVES]
        assert not any(_dominates([p[m] for m in OBJECTIVES], key) for p in pool)
    chosen = (saved["chosen"]["trial"], saved["chosen"]["model"])
    assert chosen in [(c["trial"], c["model"]) for c in saved["candidate_front"]]
    html = (out / "sweep.html").read_text()
    assert "Pareto front" in html and html.count("data:image/png;base64") == 2
    assert (out / "sweep_pareto.png").stat().st_size > 0


def _poll_for_kill(out: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Wait until one trial has finished and another has written a checkpoint but not finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the sweep ended before it could be killed mid-trial"
        dirs = list(out.glob("trial-*"))
        finished = [d for d in dirs if (d / "metrics.json").exists()]
        running = [
            d for d in dirs if not (d / "metrics.json").exists() and list(d.glob("checkpoint-*/trainer_state.json"))
        ]
        if finished and running:
            return
        time.sleep(0.02)
    raise AssertionError("no trial reached a checkpoint in time")


@pytest.mark.multiprocess
def test_killed_sweep_resumes_to_the_requested_trials_without_loss_or_duplicates(sweep_raw, tmp_path, caplog):
    sweep_raw["training"].update(max_steps=40, save_steps=5)  # a long window between a checkpoint and the end
    sweep_raw["regularizers"] = sweep_raw["regularizers"][:1]  # the two-worker test covers the candidates
    sweep_raw["sweep"].update(trials=3, stale_after_s=2)
    config = tmp_path / "kill.yaml"
    config.write_text(yaml.safe_dump(sweep_raw))
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "tether", "sweep", str(config), "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            _poll_for_kill(out, proc)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    storage = f"sqlite:///{out / 'sweep.db'}"
    before = optuna.load_study(study_name="kill", storage=storage).get_trials()
    done_before = {t.number: t.values for t in before if t.state == TrialState.COMPLETE}
    (killed,) = [t for t in before if t.state == TrialState.RUNNING]
    assert done_before and len(done_before) < 3

    with caplog.at_level(logging.WARNING, logger="tether.run"):
        run_sweep(validate_config(sweep_raw), out, study_name="kill")

    after = optuna.load_study(study_name="kill", storage=storage).get_trials()
    complete = [t for t in after if t.state == TrialState.COMPLETE]
    assert len(complete) == 3
    assert {t.number: t.values for t in complete if t.number in done_before} == done_before  # kept, not re-run
    assert after[killed.number].state == TrialState.FAIL  # marked failed, and run again with the same values
    (rerun,) = [t for t in complete if t.system_attrs.get("failed_trial") == killed.number]
    assert rerun.params == killed.params
    assert rerun.user_attrs["run_dir"] == str(out.resolve() / f"trial-{killed.number}")
    assert "resuming from" in caplog.text  # from the killed trial's checkpoint
    assert _metrics(rerun)["global_step"] == 40
    assert len({t.user_attrs["run_dir"] for t in complete}) == 3
    assert not [t for t in after if t.state in (TrialState.RUNNING, TrialState.WAITING)]


def test_single_objective_sweep_reports_evaluations_for_pruning(sweep_raw, tmp_path):
    sweep_raw["sweep"].update(trials=2, objectives=["target.val_loss"])
    sweep_raw["regularizers"] = sweep_raw["regularizers"][:1]
    summary = run_sweep(validate_config(sweep_raw), tmp_path / "one", study_name="one")
    study = optuna.load_study(study_name="one", storage=f"sqlite:///{tmp_path / 'one' / 'sweep.db'}")
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert [sorted(t.intermediate_values) for t in trials] == [[5, 10], [5, 10]]
    assert summary["pareto_front"] == [study.best_trial.number]


def test_prune_callback_stops_a_hopeless_run():
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=2))
    for value in (1.0, 1.2):
        study.add_trial(optuna.trial.create_trial(value=value, intermediate_values={10: value}))
    state = type("State", (), {"global_step": 10})()
    good = PruneOnEvaluate(study.ask())
    good.on_evaluate(None, state, None, metrics={"eval_loss": 0.9})
    assert study.get_trials()[-1].intermediate_values == {10: 0.9}
    with pytest.raises(optuna.TrialPruned):
        PruneOnEvaluate(study.ask()).on_evaluate(None, state, None, metrics={"eval_loss": 3.0})


def test_surplus_trial_is_one_started_after_the_requested_number_was_taken():
    states = [TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING, TrialState.PRUNED, TrialState.RUNNING]
    trials = [SimpleNamespace(number=i, state=s) for i, s in enumerate(states)]
    assert not _surplus(trials, 3, 3)  # 0, 2 before it: a failed trial does not count
    assert _surplus(trials, 4, 3)  # 0, 2, 3 already make three


def test_ema_and_wise_ft_models_are_candidates_with_their_own_metrics():
    forgetting = {"delta_loss": 0.5, "reference_loss_after": 2.5, "recall_before": 0.9, "recall_after": 0.3}
    metrics = {
        "target": {"val_loss": 1.0},
        "forgetting": {**forgetting, "recall_drop": 0.6},
        "ema": {"target": {"val_loss": 1.1}, "forgetting": {"delta_loss": 0.4}},
        "wise_ft": {
            "chosen_alpha": 0.5,
            "alphas": [
                {"alpha": 0.5, "val_loss": 1.2, "reference_loss": 2.1, "delta_loss": 0.1, "recall": 0.8},
                {"alpha": 1.0, "val_loss": 1.0, "reference_loss": 2.5, "delta_loss": 0.5, "recall": 0.3},
            ],
        },
    }
    model, ema, wise = candidates(metrics)
    assert model["metrics"]["forgetting.recall_drop"] == 0.6
    assert ema == {"model": "model_ema", "metrics": {"target.val_loss": 1.1, "forgetting.delta_loss": 0.4}}
    assert wise["model"] == "model_wise_ft" and wise["alpha"] == 0.5
    assert wise["metrics"]["target.val_loss"] == 1.2 and wise["metrics"]["forgetting.delta_loss"] == 0.1
    assert wise["metrics"]["forgetting.recall_drop"] == pytest.approx(0.1)
    metrics["wise_ft"]["chosen_alpha"] = 1.0  # alpha 1 is model/ itself: no second copy
    assert [c["model"] for c in candidates(metrics)] == ["model", "model_ema"]


def test_front_and_choice_follow_the_directions_and_the_tolerance():
    sweep = SweepConfig(params={"x": {"distribution": "uniform", "low": 0, "high": 1}}, tolerance=0.1)
    items = [
        {"name": "a", "values": {"target.val_loss": 1.00, "forgetting.delta_loss": 0.9}},
        {"name": "b", "values": {"target.val_loss": 1.05, "forgetting.delta_loss": 0.2}},
        {"name": "c", "values": {"target.val_loss": 1.50, "forgetting.delta_loss": 0.1}},
        {"name": "d", "values": {"target.val_loss": 1.60, "forgetting.delta_loss": 0.3}},  # dominated by c
    ]
    assert [i["name"] for i in non_dominated(items, OBJECTIVES)] == ["a", "b", "c"]
    assert choose(items, sweep)["name"] == "b"  # least forgetting within 10% of the best target loss
    assert choose(items, sweep.model_copy(update={"choose": "best_target"}))["name"] == "a"
    recall = [{"name": n, "values": {"forgetting.recall_after": r}} for n, r in (("low", 0.2), ("high", 0.9))]
    assert non_dominated(recall, ["forgetting.recall_after"])[0]["name"] == "high"  # maximized


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (
            "sweep.params",
            {"regularizers.5.strength": {"distribution": "uniform", "low": 0, "high": 1}},
            "not an index",
        ),
        (
            "sweep.params",
            {"training.learnig_rate": {"distribution": "log_uniform", "low": 1e-4, "high": 1e-3}},
            "sweep.params.training.learnig_rate",
        ),
        ("sweep.params", {"regularizers.0.strength": {"distribution": "uniform", "low": -1, "high": 1}}, "= -1"),
        ("sweep.params", {"regularizers.0.strength": {"distribution": "log_uniform", "low": 0, "high": 1}}, "low > 0"),
        ("sweep.params", {"lora.r": {"distribution": "int", "low": 2.5, "high": 8}}, "whole numbers"),
        ("sweep.params", {"lora.target_modules": {"distribution": "categorical"}}, "non-empty choices"),
        ("sweep.objectives", ["target.accuracy"], "sequence_classification only"),
        ("sweep.objectives", ["target.val_los"], "sweep.objectives.0: unknown metric"),
        (
            "sweep.objectives",
            ["forgetting.delta_loss", "target.val_loss"],
            "choose least_forgetting takes the first objective as the target metric, and forgetting.delta_loss",
        ),
        ("sweep.constraints", [{"metric": "overfit_gap"}], "give max or min"),
        ("data.reference", None, "measured on data.reference"),
    ],
)
def test_bad_sweep_sections_name_the_field(sweep_raw, path, value, expected):
    raw = copy.deepcopy(sweep_raw)
    section, key = path.split(".")
    raw[section][key] = value
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        validate_config(raw)


def test_a_study_refuses_another_config(sweep_raw, tmp_path):
    cfg = validate_config(sweep_raw)
    job = Job(cfg, tmp_path, f"sqlite:///{tmp_path / 'sweep.db'}", "s", 4)
    open_study(job)
    open_study(Job(cfg, tmp_path, job.storage, "s", 9))  # more trials: the same study goes on
    sweep_raw["sweep"]["params"]["regularizers.0.strength"]["high"] = 10.0
    with pytest.raises(TetherError, match="made from a different config"):
        open_study(Job(validate_config(sweep_raw), tmp_path, job.storage, "s", 4))


def test_a_bad_storage_url_is_one_error_and_writes_nothing(sweep_raw, tmp_path):
    url = f"sqlite:///{tmp_path / 'no-such-dir' / 'x.db'}"  # SQLite cannot create a file in a missing directory
    with pytest.raises(TetherError, match="--storage sqlite:///.*: cannot use the database"):
        run_sweep(validate_config(sweep_raw), tmp_path / "out", study_name="s", storage=url)
    assert not (tmp_path / "out").exists()
    assert masked("postgresql+psycopg2://u:secret@db/x") == "postgresql+psycopg2://u:***@db/x"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url() -> Any:
    """A throwaway PostgreSQL server on loopback (Debian's postgresql package: initdb, pg_ctl)."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL's initdb/pg_ctl are not installed (apt-get install postgresql)")
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver: pip install psycopg2-binary")
    root = Path(tempfile.mkdtemp(prefix="tether-pg-"))  # not under pytest's tmp: its parents are private to us
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the postgres system user
        if shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode:
            pytest.skip("running as root without a postgres user to start the server as")
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()
    subprocess.run(
        [*as_user, initdb, "-D", str(data), "-U", "tether", "--auth=trust"], check=True, capture_output=True
    )
    opts = f"-h 127.0.0.1 -p {port} -k {root}"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start"], check=True)
    try:
        yield f"postgresql+psycopg2://tether@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_sweep_on_postgresql_with_two_workers(sweep_raw, tmp_path, postgres_url):
    sweep_raw["sweep"]["trials"] = 3
    summary = run_sweep(validate_config(sweep_raw), tmp_path / "pg", study_name="pg", storage=postgres_url, workers=2)
    study = optuna.load_study(study_name="pg", storage=postgres_url)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 3
    assert summary["storage"].startswith("postgresql+psycopg2://tether@127.0.0.1")
    assert not (tmp_path / "pg" / "sweep.db").exists()


def test_summary_judges_each_candidate_on_the_constraints_it_can(sweep_raw, tmp_path):
    """A WiSE-FT interpolation has no train loss: a constraint on overfit_gap leaves it out instead of crashing;
    an infeasible model/ is never chosen."""
    from tether.harness.sweep.summary import summarize

    sweep_raw["sweep"]["constraints"] = [{"metric": "overfit_gap", "max": 0.5}]
    job = Job(validate_config(sweep_raw), tmp_path, "sqlite://", "s", 2)
    study = optuna.create_study(directions=["minimize", "minimize"])
    metrics = {
        "target": {"val_loss": 1.0, "train_loss": 0.2}, "overfit_gap": 0.8,  # over the bound: infeasible
        "forgetting": {"delta_loss": 2.0, "recall_before": 1.0, "recall_after": 0.0, "recall_drop": 1.0},
        "ema": {"target": {"val_loss": 1.1, "train_loss": 0.8}, "overfit_gap": 0.3,
                "forgetting": {"delta_loss": 1.0, "recall_before": 1.0, "recall_after": 0.5, "recall_drop": 0.5}},
        "wise_ft": {"chosen_alpha": 0.5, "alphas": [{"alpha": 0.5, "val_loss": 1.2, "delta_loss": 0.1}]},
    }  # fmt: skip
    attrs = {"run_dir": str(tmp_path / "trial-0"), "candidates": candidates(metrics)}
    study.add_trial(optuna.trial.create_trial(values=[1.0, 2.0], user_attrs=attrs))
    summary = summarize(study, job)
    assert summary["chosen"]["model"] == "model_ema"  # the only feasible candidate that has an overfit gap
    assert {c["model"] for c in summary["candidate_front"]} == {"model_ema"}
