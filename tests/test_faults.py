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
from tether.config import validate_config


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


def test_a_second_run_into_a_held_directory_is_refused_naming_the_holder(raw_config, tmp_path, monkeypatch, capsys):
    from tether.outputs import hold_run_dir

    config, out = _write(_config(raw_config), tmp_path), tmp_path / "run"
    with hold_run_dir(out):  # the first run
        code, err = _cli(monkeypatch, capsys, "train", str(config), "--output-dir", str(out))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{out} is in use by another run (pid {os.getpid()} on " in err
    assert not out.exists()  # the holder created it and removed it, empty, when it ended


def test_the_lock_of_a_killed_run_is_taken_over(raw_config, tmp_path, caplog):
    """The lock is an flock on OUT/.tether/lock, which the kernel drops when its holder dies (SIGKILL here)."""
    out = tmp_path / "run"
    hold = "import sys; from pathlib import Path; from tether.outputs import hold_run_dir; "
    hold += "h = hold_run_dir(Path(sys.argv[1])); h.__enter__(); print('held', flush=True); sys.stdin.read()"
    proc = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"held\n"
    proc.kill()
    proc.wait()
    assert f"pid {proc.pid} on " in (out / ".tether" / "lock").read_text()  # left behind by the killed run
    metrics = tether.run.train(validate_config(_config(raw_config)), out)
    assert metrics["global_step"] == 16
    assert f"taking over the lock of a run that ended without releasing it (pid {proc.pid} on " in caplog.text
    assert (out / ".tether" / "lock").read_text() == ""  # released at the end


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.learning_rate=abc", "training.learning_rate: 'abc' is not a finite number"),
        ("training.learning_rate=-1", "training.learning_rate: -1 must be greater than 0"),
        ("training.per_device_train_batch_size=0", "training.per_device_train_batch_size: 0 must be greater than 0"),
        ("training.lr_scheduler_type=warp", "training: warp is not a valid SchedulerType"),
        ("training.max_steps=" + "1" * 100_000, "--set training.max_steps: the value cannot be read (Exceeds"),
        ("training.learning_rate=[1", "--set training.learning_rate: the value cannot be read (not valid YAML)"),
        # what a regularizer's setup refuses from the model is refused by validate from the config
        ("regularizers.0={name: kl, reference: {adapter: clone}}", "regularizers[0]: kl.reference.adapter applies"),
        ("regularizers.0={name: ewc, fisher_path: /no/f.safetensors}", "regularizers[0]: ewc.fisher_path: /no/f."),
        ("regularizers.0={name: l2_sp, strength: 1000}", "regularizers[0]: l2_sp.strength: lr * strength = 3 >= 1"),
        # a metric no evaluation logs stopped the run only at its first evaluation
        ("early_stopping={metric: eval_los}", "early_stopping.metric eval_los is not logged at this run's"),
    ],
)
def test_validate_rejects_what_train_rejects_with_the_same_line(raw_config, tmp_path, monkeypatch, capsys, override,
                                                                  message):  # fmt: skip
    config, out = _write(_config(raw_config), tmp_path), tmp_path / "run"
    code, err = _cli(monkeypatch, capsys, "validate", str(config), "--set", override)
    train_code, train_err = _cli(
        monkeypatch, capsys, "train", str(config), "--output-dir", str(out), "--set", override
    )
    assert (code, train_code) == (2, 2) and err == train_err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {message}")
    assert not out.exists()


def test_an_output_path_too_long_is_one_line(raw_config, tmp_path, monkeypatch, capsys):
    config = _write(_config(raw_config), tmp_path)
    code, err = _cli(monkeypatch, capsys, "train", str(config), "--output-dir", str(tmp_path / ("x" * 300)))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "(File name too long)" in err, err


def test_a_full_disk_during_a_save_is_one_line(raw_config, tmp_path, monkeypatch, capsys):
    import errno

    import tether.trainer

    def full(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(tether.trainer, "save_safetensors_atomic", full)  # the first checkpoint's save
    config, out = _write(_config(raw_config), tmp_path), tmp_path / "run"
    code, err = _cli(monkeypatch, capsys, "train", str(config), "--output-dir", str(out))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    staged = out / ".staging" / "run" / "checkpoint-4" / "tether_state.safetensors"
    assert err == f"error: no space left on device at {staged}: free space and rerun; nothing lost\n"


def test_outputs_follow_the_umask_and_the_fisher_file_is_reproducible(raw_config, tmp_path):
    raw = _config(raw_config, max_steps=4, save_steps=2, eval_steps=2)
    raw["regularizers"] = [{"name": "ewc", "strength": 0.1}]
    previous = os.umask(0o027)
    try:
        tether.run.train(validate_config(raw), tmp_path / "run")
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in (tmp_path / "run").rglob("*")}
    assert {m for p, m in modes.items() if (tmp_path / p).is_file()} == {0o640}, modes
    assert {m for p, m in modes.items() if (tmp_path / p).is_dir()} == {0o750}, modes


def test_safetensors_metadata_is_written_in_one_order(tmp_path):
    """safetensors writes metadata in hash-map order, which differs from call to call in one process."""
    import torch

    from tether.outputs import save_safetensors_atomic

    metadata = {f"key{i}": str(i) for i in range(8)}
    for i in range(6):
        save_safetensors_atomic({"w": torch.ones(3)}, tmp_path / f"{i}.safetensors", metadata)
    files = {(tmp_path / f"{i}.safetensors").read_bytes() for i in range(6)}
    assert len(files) == 1


def test_version(monkeypatch, capsys):
    from importlib.metadata import version

    from tether.cli import main

    monkeypatch.setattr(sys, "argv", ["tether", "--version"])
    main()  # exit status 0: main() returns
    assert capsys.readouterr().out == f"tether {version('tether')}\n"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("regularizers.0={name: kl}", "kl on FSDP need LoRA (a `lora:` section)"),
        ("regularizers.0={name: ema}", "ema keep whole-model copies and do not run on FSDP"),
        ("osf={effective_rank: 0.5}", "osf: FSDP2 replaces each parameter by its shards"),
        (
            "evaluation.lm_eval={tasks: [arc_easy], at_evaluations: true}",
            "evaluation.lm_eval.at_evaluations does not run on FSDP's shards",
        ),
    ],
)
def test_validate_refuses_what_cannot_run_on_the_fsdp_the_config_asks_for(raw_config, tmp_path, monkeypatch, capsys,
                                                                           override, message):  # fmt: skip
    """training.fsdp in the config: validate asks run.check_sharding, which train asks of the trainer's launch."""
    config = _write(_config(raw_config), tmp_path)
    code, err = _cli(monkeypatch, capsys, "validate", str(config), "--set", "training.fsdp=true", "--set", override)
    assert code == 2 and err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1, err
    from tether.cli import main

    monkeypatch.setattr(sys, "argv", ["tether", "validate", str(config), "--set", "training.fsdp=true"])
    main()  # l2 and weight_decay run on shards: no refusal
    assert capsys.readouterr().out.startswith("ok ")
