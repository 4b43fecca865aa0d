"""Fault cases of `tether train` as a user meets them: Ctrl-C / SIGTERM, two runs into one directory, a full disk,
a damaged checkpoint, a kill after training ended. Each ends in one line and an exit status that tells what
happened, and nothing is lost."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from transformers import TrainerCallback

import tether.run


def _config(raw_config: dict, **training) -> dict:
    raw = copy.deepcopy(raw_config)
    raw["training"].update(max_steps=16, eval_steps=4, save_steps=4, logging_steps=2, save_total_limit=None)
    raw["training"].update(training)
    return raw


def _write(raw: dict, tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """`tether ARGS` in this process: the exit status and stderr."""
    from tether.cli import main

    monkeypatch.setattr(sys, "argv", ["tether", *args])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code, capsys.readouterr().err


class SignalAt(TrainerCallback):
    """Sends this process `signum` after optimizer step `at`, as Ctrl-C or `kill` would."""

    def __init__(self, signum: int, at: int) -> None:
        self.signum, self.at = signum, at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            os.kill(os.getpid(), self.signum)


def _with_callbacks(monkeypatch, *extra: TrainerCallback) -> None:
    """tether.run.train as the CLI calls it, with more Trainer callbacks."""
    train = tether.run.train

    def with_extra(cfg, output_dir, **kw):
        return train(cfg, output_dir, **{**kw, "callbacks": [*kw.get("callbacks", []), *extra]})

    monkeypatch.setattr(tether.run, "train", with_extra)


@pytest.fixture
def keep_sigterm():
    """`tether train` installs its SIGTERM handler in this process: put pytest's back afterwards."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_training_in_one_line(raw_config, tmp_path, monkeypatch, capsys, keep_sigterm, signum, status):
    config, out = _write(_config(raw_config), tmp_path), tmp_path / "run"
    _with_callbacks(monkeypatch, SignalAt(signum, 6))
    args = ["train", str(config), "--output-dir", str(out), "--set", "training.seed=0"]
    code, err = _cli(monkeypatch, capsys, *args)
    assert code == status, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("interrupted: stopped at step 6 of 16 (last checkpoint: ") and "checkpoint-4)" in line
    assert line.endswith(f"tether train {config} --output-dir {out} --set=training.seed=0 --resume")
    assert not (out / "metrics.json").exists()


def test_ctrl_c_in_a_real_process_exits_130_with_the_resume_command(raw_config, tmp_path):
    raw = _config(raw_config, max_steps=2000, eval_steps=1000)
    config, out = _write(raw, tmp_path), tmp_path / "run"
    cmd = [sys.executable, "-m", "tether", "train", str(config), "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint-4").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("interrupted: stopped at step ") and line.endswith(" --resume"), err
    assert "Traceback" not in err
