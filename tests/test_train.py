"""`tether train` end to end on a tiny synthetic model: outputs, metrics, early stopping with best restore, CLI."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tether.config import validate_config
from tether.data import Collator, load_split
from tether.evaluate import dataset_metrics
from tether.run import train

ROOT = Path(__file__).resolve().parents[1]


def _overfitting_config(raw_config: dict, lora: bool) -> dict:
    """Random strings to memorize: validation loss falls (character statistics), then rises as it memorizes."""
    raw = copy.deepcopy(raw_config)
    raw["training"] = {
        "learning_rate": 1e-1 if lora else 3e-2, "max_steps": 150, "per_device_train_batch_size": 8,
        "eval_steps": 5, "logging_steps": 5, "per_device_eval_batch_size": 64,
    }  # fmt: skip
    raw["early_stopping"] = {"patience": 2}
    raw["regularizers"] = []
    if lora:
        raw["lora"] = {"r": 8, "alpha": 16, "dropout": 0.0}
    return raw


def _eval_losses(history_path: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in history_path.read_text().splitlines()]
    return {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_early_stopping_restores_the_best_checkpoint(raw_config, tmp_path, lora):
    cfg = validate_config(_overfitting_config(raw_config, lora))
    out = tmp_path / "run"
    metrics = train(cfg, out)
    losses = _eval_losses(out / "history.jsonl")
    best = min(losses, key=losses.get)
    assert metrics["stopped_early"], f"never stopped: {losses}"
    assert metrics["best_step"] == best
    assert max(losses) > best, "the run must go past its best step for the test to mean anything"
    # The saved model is the best one: its validation loss is the best evaluation's, not the last one's.
    assert metrics["target"]["val_loss"] == pytest.approx(losses[best], rel=1e-4)
    assert losses[max(losses)] > losses[best] + 1e-4
    if lora:
        assert (out / "model" / "adapter_config.json").exists()
        assert (out / "model" / "adapter_model.safetensors").exists()


def test_metrics_history_curves_and_model_written(raw_config, tmp_path):
    cfg = validate_config(raw_config)
    out = tmp_path / "run"
    metrics = train(cfg, out)
    for name in ("metrics.json", "history.jsonl", "curves.png", "config.yaml", "model/model.safetensors"):
        assert (out / name).exists(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    flat = {
        "target.val_loss": saved["target"]["val_loss"],
        "target.train_loss": saved["target"]["train_loss"],
        "overfit_gap": saved["overfit_gap"],
        **{f"forgetting.{k}": v for k, v in saved["forgetting"].items()},
    }
    for key in ("reference_loss_before", "reference_loss_after", "delta_loss", "recall_before", "recall_after"):
        assert f"forgetting.{key}" in flat
    assert all(math.isfinite(v) for v in flat.values()), flat
    assert flat["overfit_gap"] == pytest.approx(flat["target.val_loss"] - flat["target.train_loss"])
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    logged = [h for h in history if "loss" in h]
    assert logged and all("reg/l2" in h for h in logged), "each logging step carries the penalty term"
    assert (out / "config.yaml").read_text().startswith("model:")


def test_saved_model_reloads_with_the_same_loss(raw_config, tmp_path):
    from tether.models import load_model

    cfg = validate_config(raw_config)
    metrics = train(cfg, tmp_path / "run")
    model, tok, _ = load_model(
        cfg.model.model_copy(update={"path": str(tmp_path / "run/model"), "synthetic": None}), "causal_lm"
    )
    val = load_split(str(cfg.data.validation), "validation", "prompt_completion", "causal_lm", tok, 32)
    assert dataset_metrics(model, val.encoded, Collator(tok.pad_token_id))["loss"] == pytest.approx(
        metrics["target"]["val_loss"], rel=1e-5
    )


def test_classification_reports_accuracy_and_f1(tmp_path):
    raw = {
        "model": {"synthetic": {"arch": "bert", "hidden_size": 32, "num_layers": 1, "num_heads": 4}},
        "task": "sequence_classification",
        "data": {"train": str(ROOT / "examples/data/sentiment.jsonl"), "format": "text", "max_length": 48},
        "training": {"learning_rate": 1e-3, "max_steps": 30, "eval_steps": 10},
    }
    metrics = train(validate_config(raw), tmp_path / "run")
    assert 0.0 <= metrics["target"]["accuracy"] <= 1.0
    assert 0.0 <= metrics["target"]["f1"] <= 1.0
    assert "forgetting" not in metrics


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tether", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_cli_trains_the_shipped_quickstart_config(tmp_path):
    out = tmp_path / "qs"
    res = _cli("train", "configs/quickstart.yaml", "--output-dir", str(out), "--set", "training.max_steps=20")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "memory estimate (before activations)" in res.stdout and "model weights" in res.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] <= 20
    assert "forgetting" in metrics
    again = _cli("train", "configs/quickstart.yaml", "--output-dir", str(out))
    assert again.returncode == 2 and "holds a finished run" in again.stderr and "--overwrite" in again.stderr


def _cli_inprocess(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """The CLI's main() in this process (no interpreter start-up): exit code and stderr."""
    from tether.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["tether", *args])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("regularizers.0.strength=-1", "regularizers[0]: weight_decay.strength"),
        ("data.train=nope.jsonl", "data.train: file nope.jsonl does not exist"),
        ("training.max_stepz=3", "did you mean 'max_steps'"),
        ("early_stopping.patience=0", "early_stopping.patience"),
    ],
)
def test_cli_bad_config_is_one_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys, override, expected):
    out = tmp_path / "never"
    for command in ("validate", "train"):
        extra = ["--output-dir", str(out)] if command == "train" else []
        code, err = _cli_inprocess(monkeypatch, capsys, command, "configs/quickstart.yaml", "--set", override, *extra)
        assert code == 2, err
        assert expected in err.replace("\n", "")
        assert "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [(["train"], "Missing argument 'config'"), (["train", "c.yaml", "--bogus"], "No such option: --bogus")],
)
def test_cli_usage_error_is_one_line_exit_2(monkeypatch, capsys, args, expected):
    code, err = _cli_inprocess(monkeypatch, capsys, *args)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err


def test_cli_bad_data_row_is_one_line(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": 1}\n')
    code, err = _cli_inprocess(
        monkeypatch,
        capsys,
        "train",
        "configs/quickstart.yaml",
        "--set",
        f"data.train={bad}",
        "--output-dir",
        str(tmp_path / "o"),
    )
    assert code == 2
    assert f"{bad}:2: missing field 'completion'" in err.replace("\n", "")


def test_cli_validate_ok(monkeypatch, capsys):
    from tether.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["tether", "validate", "configs/quickstart.yaml"])
    main()
    assert "ok" in capsys.readouterr().out


def test_eval_command_measures_a_saved_model(raw_config, tmp_path, monkeypatch, capsys):
    import yaml

    raw = copy.deepcopy(raw_config)
    metrics = train(validate_config(raw), tmp_path / "run")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    from tether.cli import main

    monkeypatch.setattr(sys, "argv", ["tether", "eval", str(path), "--model", str(tmp_path / "run" / "model")])
    main()
    out = json.loads(capsys.readouterr().out)
    assert out["target"]["val_loss"] == pytest.approx(metrics["target"]["val_loss"], rel=1e-5)
    assert out["reference"]["loss"] == pytest.approx(metrics["forgetting"]["reference_loss_after"], rel=1e-5)
    code, err = _cli_inprocess(monkeypatch, capsys, "eval", str(path), "--model", str(tmp_path / "nope"))
    assert code == 2 and "is not a directory" in err
