"""A run interrupted after a checkpoint and started again ends with the same weights as an uninterrupted one."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from tether.config import validate_config
from tether.errors import TetherError
from tether.run import train

ROOT = Path(__file__).resolve().parents[1]


class Crash(TrainerCallback):
    """Stands in for a kill: raises right after the optimizer step `at` (checkpoints before it are on disk)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt


def _config(raw_config: dict) -> dict:
    raw = copy.deepcopy(raw_config)
    raw["training"].update(max_steps=16, eval_steps=4, save_steps=4, save_total_limit=None, logging_steps=2)
    raw["training"]["save_strategy"] = "steps"
    raw["early_stopping"] = {"patience": 10}
    return raw


def _weights(run: Path, model: str = "model") -> dict[str, torch.Tensor]:
    return load_file(str(run / model / "model.safetensors"))


def test_interrupted_run_resumes_to_the_same_weights(raw_config, tmp_path):
    """Includes regularizer state: the EMA average (checkpointed) and the EWC Fisher (kept in the run dir)."""
    raw = _config(raw_config)
    raw["regularizers"] += [{"name": "ema", "decay": 0.8}, {"name": "ewc", "strength": 0.1}]
    cfg = validate_config(raw)
    straight = train(cfg, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "resumed", callbacks=[Crash(at=10)])
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    assert (tmp_path / "resumed" / "checkpoint-8" / "tether_state.safetensors").is_file()
    resumed = train(cfg, tmp_path / "resumed")  # an unfinished run with checkpoints resumes by itself
    for model in ("model", "model_ema"):
        a, b = _weights(tmp_path / "straight", model), _weights(tmp_path / "resumed", model)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)  # bit-exact on CPU
    assert resumed["target"]["val_loss"] == straight["target"]["val_loss"]
    assert resumed["ema"]["target"]["val_loss"] == straight["ema"]["target"]["val_loss"]
    assert resumed["best_step"] == straight["best_step"]


def test_resume_uses_the_fisher_in_the_run_dir(raw_config, tmp_path):
    """The Fisher is estimated once per run: a resumed run reads RUN_DIR/fisher.safetensors (changed here to show
    it is read, not re-estimated)."""
    from safetensors.torch import save_file

    raw = _config(raw_config)
    raw["regularizers"] = [{"name": "ewc", "strength": 1.0, "normalize": False}]
    cfg = validate_config(raw)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run", callbacks=[Crash(at=6)])
    fisher = load_file(str(tmp_path / "run" / "fisher.safetensors"))
    save_file({n: torch.zeros_like(f) for n, f in fisher.items()}, str(tmp_path / "run" / "fisher.safetensors"))
    train(cfg, tmp_path / "run")
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    after = [h["reg/ewc"] for h in history if "reg/ewc" in h and h["step"] > 8]
    assert after and all(v == 0 for v in after)  # a zero Fisher: the penalty is zero after the resume
    assert any(h["reg/ewc"] > 0 for h in history if "reg/ewc" in h and h["step"] <= 6)


def test_resume_without_checkpoint_is_an_error(raw_config, tmp_path):
    cfg = validate_config(_config(raw_config))
    with pytest.raises(TetherError, match="train without --resume"):
        train(cfg, tmp_path / "empty", resume=True)


def test_overwrite_starts_fresh(raw_config, tmp_path):
    cfg = validate_config(_config(raw_config))
    train(cfg, tmp_path / "run")
    with pytest.raises(TetherError, match="finished run"):
        train(cfg, tmp_path / "run")
    metrics = train(cfg, tmp_path / "run", overwrite=True)
    assert metrics["global_step"] == 16


@pytest.mark.slow
def test_sigkill_then_resume(raw_config, tmp_path):
    """The real thing: SIGKILL a `tether train` process mid-run, start it again, compare with a straight run."""
    raw = _config(raw_config)
    raw["training"]["max_steps"] = 80
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "tether", "train", str(path), "--output-dir"]
    subprocess.run([*cmd, str(tmp_path / "straight")], check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen([*cmd, str(tmp_path / "killed")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((tmp_path / "killed").glob("checkpoint-2*")) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run([*cmd, str(tmp_path / "killed")], check=True, capture_output=True, timeout=600)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_half_written_checkpoint_is_set_aside(raw_config, tmp_path):
    """A kill during a save leaves a checkpoint without trainer_state.json (written last): resume skips it."""
    cfg = validate_config(_config(raw_config))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run", callbacks=[Crash(at=10)])
    torn = tmp_path / "run" / "checkpoint-12"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"\0" * 10)  # what a kill mid-write leaves
    (tmp_path / "run" / "checkpoint-8" / "trainer_state.json").write_text('{"half": ')
    metrics = train(cfg, tmp_path / "run")
    assert metrics["global_step"] == 16
    aside = {p.name.split("-")[2] for p in (tmp_path / "run").glob(".incomplete-*")}
    assert aside == {"8", "12"}  # both torn ones set aside; the run went on from checkpoint-4


@pytest.mark.parametrize(("override", "term"), [("learning_rate", "the task loss"), ("l2", "reg/l2")])
def test_non_finite_loss_stops_with_the_term_named(raw_config, tmp_path, override, term):
    raw = _config(raw_config)
    if override == "learning_rate":
        raw["training"]["learning_rate"] = 1e30  # weights overflow within a few steps
        raw["regularizers"] = []
    else:
        raw["regularizers"][1]["strength"] = 1e38  # finite, but the weighted penalty overflows
    with pytest.raises(TetherError) as e:
        train(validate_config(raw), tmp_path / "run")
    assert term in str(e.value) and "step " in str(e.value)
    if override == "l2":  # a closed-form penalty is valued when logged: at the first logging step's weights
        assert str(e.value).startswith("step 2: reg/l2 became inf (weighted)")
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_non_finite_closed_form_penalty_is_caught_before_a_checkpoint_is_saved(raw_config, tmp_path):
    raw = _config(raw_config)
    raw["training"]["logging_steps"] = 100  # no log before the first save, at step 4
    raw["regularizers"][1]["strength"] = 1e38
    with pytest.raises(TetherError, match="^step 4: reg/l2 became inf .*no checkpoint was written yet"):
        train(validate_config(raw), tmp_path / "run")
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def poison(module, inputs, out):
    out["logits"], out["loss"] = out.logits * torch.nan, out.loss * torch.nan


class NaNAt(TrainerCallback):
    """Makes the logits NaN in the forward passes of optimizer step `at` only (a one-off spike)."""

    def __init__(self, at: int) -> None:
        self.at, self.handle = at, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.at:
            self.handle = model.register_forward_hook(poison)

    def on_step_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def test_skip_non_finite_drops_that_update_and_goes_on(raw_config, tmp_path):
    raw = _config(raw_config)
    raw["skip_non_finite"] = 1
    metrics = train(validate_config(raw), tmp_path / "skip", callbacks=[NaNAt(5)])
    assert metrics["global_step"] == 16 and metrics["skipped_steps"] == 1
    assert all(torch.isfinite(w).all() for w in _weights(tmp_path / "skip").values())
    raw["skip_non_finite"] = 0
    with pytest.raises(TetherError, match="step 5: the task loss became nan"):
        train(validate_config(raw), tmp_path / "stop", callbacks=[NaNAt(5)])


def test_a_fresh_start_estimates_its_own_fisher(raw_config, tmp_path):
    """A Fisher left by an attempt killed before its first checkpoint is not reused: the data may have changed."""
    from safetensors.torch import save_file

    raw = _config(raw_config)
    raw["regularizers"] = [{"name": "ewc", "strength": 1.0, "normalize": False}]
    cfg = validate_config(raw)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run", callbacks=[Crash(at=2)])  # before the first checkpoint (step 4)
    fisher = load_file(str(tmp_path / "run" / "fisher.safetensors"))
    save_file({n: torch.zeros_like(f) for n, f in fisher.items()}, str(tmp_path / "run" / "fisher.safetensors"))
    train(cfg, tmp_path / "run")
    estimated = load_file(str(tmp_path / "run" / "fisher.safetensors"))
    assert all(torch.equal(estimated[n], fisher[n]) for n in fisher)  # estimated again, not the zeros


def test_a_flag_the_optimizer_never_read_does_not_stop_the_next_step():
    """fp16's loss scaler skips optimizer.step() on non-finite gradients: the stack's flag from that step is dropped
    at the step's end instead of stopping the next, healthy step."""
    from tether.regularizers import RegularizerStack
    from tether.trainer import StepEnd

    stack = RegularizerStack([])
    stack.flag_non_finite("the task loss became nan")
    StepEnd(stack).on_step_end(None, None, None)
    assert stack._skip_this_step() is False
    stack.flag_non_finite("the task loss became nan")
    with pytest.raises(TetherError, match="the task loss became nan"):
        stack._skip_this_step()


def test_a_kill_during_a_save_leaves_no_checkpoint_to_resume_from(raw_config, tmp_path, monkeypatch):
    """Checkpoints are written under .staging/ and renamed into place: an interruption in the middle of writing
    checkpoint-8 leaves checkpoint-4 as the last one, and the restarted run ends as an uninterrupted one."""
    from tether.trainer import RegularizedTrainer

    cfg = validate_config(_config(raw_config))
    straight = train(cfg, tmp_path / "straight")
    save_rng = RegularizedTrainer._save_rng_state

    def killed_at_step_8(self, output_dir):
        if self.state.global_step == 8:
            raise KeyboardInterrupt  # after the model and optimizer of checkpoint-8 are written, before the rest
        save_rng(self, output_dir)

    monkeypatch.setattr(RegularizedTrainer, "_save_rng_state", killed_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-4"]
    assert (tmp_path / "run" / ".staging" / "run" / "checkpoint-8" / "model.safetensors").is_file()  # half-written
    monkeypatch.setattr(RegularizedTrainer, "_save_rng_state", save_rng)
    resumed = train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / ".staging").exists()
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "run")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    assert resumed["best_step"] == straight["best_step"]


def test_resume_with_a_changed_config_is_refused_naming_the_keys(raw_config, tmp_path):
    """The run keeps the config it started with in OUT/.tether/config.yaml; --accept-changes takes new values
    that apply on resume (a strength, max_steps), never one the optimizer state restores (the learning rate)."""
    raw = _config(raw_config)
    with pytest.raises(KeyboardInterrupt):
        train(validate_config(raw), tmp_path / "run", callbacks=[Crash(at=6)])
    changed = copy.deepcopy(raw)
    changed["regularizers"][1]["strength"] = 2e-4
    changed["training"].update(max_steps=12)
    refused = r"started with another config \(changed: regularizers.1.strength, training.max_steps\): undo the"
    with pytest.raises(TetherError, match=refused):
        train(validate_config(changed), tmp_path / "run")
    changed["training"]["learning_rate"] = 1e-3
    with pytest.raises(TetherError, match="--accept-changes: training.learning_rate cannot change on resume"):
        train(validate_config(changed), tmp_path / "run", accept_changes=True)
    changed["training"]["learning_rate"] = raw["training"]["learning_rate"]
    metrics = train(validate_config(changed), tmp_path / "run", accept_changes=True)
    assert metrics["global_step"] == 12
    final = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert final["regularizers"][1]["strength"] == 2e-4 and final["training"]["max_steps"] == 12


@pytest.mark.parametrize("damage", ["model.safetensors:empty", "model.safetensors:cut", "optimizer.pt:cut"])
def test_a_damaged_last_checkpoint_is_set_aside(raw_config, tmp_path, caplog, damage):
    """A truncated or empty weight or optimizer file in the last checkpoint: the previous intact one is used."""
    cfg = validate_config(_config(raw_config))
    straight = train(cfg, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run", callbacks=[Crash(at=10)])
    name, how = damage.split(":")
    damaged = tmp_path / "run" / "checkpoint-8" / name
    data = damaged.read_bytes()
    damaged.write_bytes(b"" if how == "empty" else data[: len(data) // 2])
    resumed = train(cfg, tmp_path / "run")
    assert "checkpoint-8 is incomplete or damaged" in caplog.text
    assert [p.name.split("-")[2] for p in (tmp_path / "run").glob(".incomplete-*")] == ["8"]
    assert resumed["target"]["val_loss"] == straight["target"]["val_loss"]  # resumed from checkpoint-4, exactly


@pytest.mark.parametrize(
    ("early_stopping", "scheduler"),
    # ran to the end; stopped at step 8 with step 4 best (watching the loss rise, as an accuracy would be watched)
    [({"patience": 10}, "linear"), ({"patience": 1, "mode": "max"}, "constant")],
    ids=["last-step", "stopped-early"],
)
@pytest.mark.parametrize("killed_in", ["measure", "after_training"])  # the final evaluation / EMA and WiSE-FT
def test_a_kill_after_training_ended_finishes_without_another_step(
    raw_config, tmp_path, monkeypatch, early_stopping, scheduler, killed_in
):
    raw = _config(raw_config)
    raw["early_stopping"] = early_stopping
    raw["training"]["lr_scheduler_type"] = scheduler
    raw["regularizers"] += [{"name": "ema", "decay": 0.8}, {"name": "wise_ft", "alphas": [0.5]}]
    cfg = validate_config(raw)
    straight = train(cfg, tmp_path / "straight")

    import tether.run
    from tether.regularizers.stack import RegularizerStack

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        if killed_in == "measure":
            m.setattr(tether.run, "measure", killed)
        else:
            m.setattr(RegularizerStack, "after_training", killed)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, tmp_path / "killed")
    steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "killed").glob("checkpoint-*"))
    resumed = train(cfg, tmp_path / "killed")
    assert sorted(int(p.name.split("-")[1]) for p in (tmp_path / "killed").glob("checkpoint-*")) == steps
    assert resumed["global_step"] == straight["global_step"] == steps[-1]
    if early_stopping["patience"] == 1:
        assert straight["stopped_early"] and straight["best_step"] < straight["global_step"]
    for model in ("model", "model_ema", "model_wise_ft"):
        a, b = _weights(tmp_path / "straight", model), _weights(tmp_path / "killed", model)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=f"{model}: {name}")
    runtime = {"train_runtime_s", "wall_time_s"}
    assert {k: v for k, v in resumed.items() if k not in runtime} == {
        k: v for k, v in straight.items() if k not in runtime
    }
