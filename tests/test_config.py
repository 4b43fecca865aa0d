"""Config validation: every class of bad value is one error naming the field; nothing is written."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tether.config import apply_override, load_config, validate_config
from tether.errors import ConfigError

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


def _with(raw: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    apply_override(out, f"{path}={yaml.safe_dump(value, default_flow_style=True).strip()}")
    return out


def test_valid_config_loads(raw_config):
    cfg = validate_config(raw_config)
    assert cfg.task == "causal_lm"
    assert [r.name for r in cfg.regularizers] == ["weight_decay", "l2"]
    assert cfg.training_arguments()["learning_rate"] == 3e-3


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("data.max_lenght", 10, "unknown key 'max_lenght' in data"),  # unknown key
        ("task", "translation", "task"),  # not one of the choices
        ("data.max_length", "long", "data.max_length"),  # wrong type
        ("regularizers.1.strength", -1.0, "regularizers[1]: l2.strength"),  # negative strength
        ("lora", {"dropout": 1.0}, "lora.dropout"),  # dropout >= 1
        ("early_stopping", {"patience": 0}, "early_stopping.patience"),  # patience < 1
        ("data.train", "missing.jsonl", "data.train: file missing.jsonl does not exist"),  # missing file
        ("regularizers.0.name", "l3", "unknown regularizer 'l3'"),
        ("regularizers.0.lambda", 1.0, "'lambda' is not a field of weight_decay"),
        ("training.learning_rat", 1.0, "did you mean 'learning_rate'"),
        ("training.weight_decay", 0.1, "use the weight_decay regularizer"),
        ("training.output_dir", "x", "set by tether"),
        ("data.format", "chat", None),  # valid: no error
    ],
)
def test_bad_values_name_the_field(raw_config, path, value, expected):
    raw = _with(raw_config, path, value)
    if expected is None:
        validate_config(raw)
        return
    with pytest.raises(ConfigError) as e:
        validate_config(raw)
    message = str(e.value)
    assert expected in message
    assert "\n" not in message


def test_model_needs_exactly_one_source(raw_config):
    raw = _with(raw_config, "model.path", "some/hub-id")
    with pytest.raises(ConfigError, match="exactly one of model.path"):
        validate_config(raw)


def test_classification_needs_text_format(raw_config):
    with pytest.raises(ConfigError, match="format must be text"):
        validate_config(_with(raw_config, "task", "sequence_classification"))


def test_duplicate_regularizer_rejected(raw_config):
    raw = copy.deepcopy(raw_config)
    raw["regularizers"].append({"name": "l2", "strength": 0.1})
    with pytest.raises(ConfigError, match="appears twice"):
        validate_config(raw)


def test_overrides_parse_yaml_values_and_indices(raw_config):
    raw = copy.deepcopy(raw_config)
    apply_override(raw, "training.learning_rate=1e-4")
    apply_override(raw, "regularizers.1.strength=0.5")
    apply_override(raw, "early_stopping.patience=4")
    cfg = validate_config(raw)
    assert cfg.training["learning_rate"] == 1e-4
    assert cfg.regularizers[1].model_dump()["strength"] == 0.5
    assert cfg.early_stopping.patience == 4
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_override(raw, "nonsense")
    with pytest.raises(ConfigError, match="not an index"):
        apply_override(raw, "regularizers.7.strength=1")


def test_yaml_no_and_on_stay_strings(raw_config):
    """YAML 1.1 would read `eval_strategy: no` as False, which TrainingArguments rejects with a puzzling message."""
    raw = copy.deepcopy(raw_config)
    apply_override(raw, "training.eval_strategy=no")
    apply_override(raw, "training.disable_tqdm=false")
    cfg = validate_config(raw)
    assert cfg.training["eval_strategy"] == "no" and cfg.training["disable_tqdm"] is False
    apply_override(raw, "training.fp16=off")  # a string where TrainingArguments wants a bool would count as true
    with pytest.raises(ConfigError, match="training.fp16: 'off' is not a boolean: write true or false"):
        validate_config(raw)


def test_load_config_reports_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path, monkeypatch):
    monkeypatch.chdir(path.parents[1])  # shipped configs use paths relative to the repository root
    load_config(path)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"name": "ewc"}, "regularizers[0]: ewc estimates its Fisher on the reference data: set data.reference"),
        ({"name": "si"}, "regularizers[0]: si measures importance on the reference data: set data.reference"),
        ({"name": "replay", "ratio": 0.1}, "regularizers[0]: replay needs rows to replay: set data.reference"),
    ],
)
def test_regularizers_that_need_reference_data_are_checked_with_the_config(raw_config, entry, expected):
    raw = copy.deepcopy(raw_config)
    del raw["data"]["reference"]
    raw["regularizers"] = [entry]
    with pytest.raises(ConfigError, match=re.escape(expected)):
        validate_config(raw)
    raw["regularizers"] = [{"name": "ewc", "fisher_path": raw["data"]["train"]}]  # a Fisher file: no reference needed
    validate_config(raw)


def test_the_registry_does_not_import_the_run_config():
    """tether.config validates regularizer entries through the registry; the registry builds on tether.section only,
    so neither waits on the other at import (no late imports, no cycle)."""
    import subprocess
    import sys

    code = "import sys, tether.regularizers; print('tether.config' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize(
    ("change", "refused"),
    [
        ({"early_stopping": {"metric": "loss"}}, None),  # the Trainer completes it to eval_loss
        ({"early_stopping": {"metric": "eval_forgetting"}}, None),
        ({"early_stopping": {"metric": "eval_probe_kl"}}, None),
        ({"early_stopping": {"metric": "eval_forgetting"}, "evaluation": {"track": False}}, "eval_forgetting is not"),
        ({"early_stopping": {"metric": "eval_probe_kl"}, "evaluation": {"probe_rows": 0}}, "eval_probe_kl is not"),
        ({"early_stopping": {"metric": "eval_lm_eval/x/acc"}}, "use one of eval_loss, eval_reference_loss"),
    ],
)
def test_early_stopping_watches_a_metric_the_evaluations_log(raw_config, change, refused):
    raw = raw_config | change
    if refused is None:
        validate_config(raw)
        return
    with pytest.raises(ConfigError, match=refused):
        validate_config(raw)


def _refused_by_validate_and_train(raw: dict, tmp_path: Path, monkeypatch, capsys, override: str) -> str:
    """The one line `tether validate` and `tether train` both exit 2 with for `--set override`; train wrote nothing."""
    from .test_faults import _cli, _write

    config, out = _write(raw, tmp_path), tmp_path / "run"
    code, err = _cli(monkeypatch, capsys, "validate", str(config), "--set", override)
    train = _cli(monkeypatch, capsys, "train", str(config), "--output-dir", str(out), "--set", override)
    assert (code, err) == train and code == 2 and len(err.strip().splitlines()) == 1, (err, train)
    assert not out.exists()
    return err.removeprefix("error: ").strip()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.save_strategy=no", "training.save_strategy no: early_stopping restores the best checkpoint, so it "
         "saves at every evaluation (eval_strategy steps): remove save_strategy or set it to steps"),
        ("training.save_strategy=best", "training.save_strategy best: early_stopping restores"),
        ("training.save_steps=7", "training.save_steps 7: early_stopping restores the best checkpoint, so it saves at "
         "every evaluation (eval_steps 10): remove save_steps or set it to 10"),
        ("training.eval_steps=", "training.eval_steps is empty: early_stopping saves at every evaluation"),
        ("training.eval_strategy=no", "early_stopping needs evaluations: set training.eval_strategy to steps or"),
    ],
)  # fmt: skip
def test_early_stopping_overrides_no_save_cadence_the_user_gave(raw_config, tmp_path, monkeypatch, capsys, override,
                                                                message):  # fmt: skip
    raw = raw_config | {"early_stopping": {"patience": 2}}
    assert _refused_by_validate_and_train(raw, tmp_path, monkeypatch, capsys, override).startswith(message)


@pytest.mark.parametrize(
    "training",
    [{}, {"save_strategy": "steps", "save_steps": 10}, {"eval_strategy": "epoch", "save_strategy": "epoch"},
     {"eval_strategy": "epoch", "save_steps": 7}],  # under epoch saves, save_steps is not read
)  # fmt: skip
def test_early_stopping_accepts_the_save_cadence_it_needs(raw_config, tmp_path, training):
    from tether.run import training_args

    raw = raw_config | {"early_stopping": {"patience": 2}}
    raw["training"] = raw["training"] | training
    args = training_args(validate_config(raw), tmp_path / "run")  # given or not, saves follow the evaluations
    assert args.save_strategy == args.eval_strategy and args.load_best_model_at_end


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.max_steps=-5", "training.max_steps: -5 must be -1 (train num_train_epochs) or greater than 0"),
        ("training.max_steps=0", "training.max_steps: 0 must be -1 (train num_train_epochs) or greater than 0"),
        ("training.num_train_epochs=-1", "training.num_train_epochs: -1 must be greater than 0"),
        ("training.eval_steps=0", "training.eval_steps: 0 must be greater than 0"),
        ("training.learning_rate=0", "training.learning_rate: 0 must be greater than 0"),
        ("training.save_total_limit=0", "training.save_total_limit: 0 must be greater than 0 (null keeps every"),
        ("training.eval_accumulation_steps=0", "training.eval_accumulation_steps: 0 must be greater than 0"),
        ("training.adam_beta2=1.5", "training.adam_beta2: 1.5 must be at least 0 and below 1"),
        ("training.seed=-1", "training.seed: -1 must be from 0 to 4294967295"),
        ("training.eval_delay=-2", "training.eval_delay: -2 must be 0 or more"),
    ],
)
def test_training_numbers_out_of_range_are_one_line(raw_config, tmp_path, monkeypatch, capsys, override, message):
    """transformers takes these without a word: it trains by epochs on max_steps -5, keeps every checkpoint on
    save_total_limit 0, and the optimizer or numpy fail on the others only once training started."""
    assert _refused_by_validate_and_train(raw_config, tmp_path, monkeypatch, capsys, override).startswith(message)


def test_max_steps_minus_one_trains_by_epochs(raw_config):
    assert validate_config(_with(raw_config, "training.max_steps", -1)).training_arguments()["max_steps"] == -1


def test_a_run_directory_given_as_the_config_names_the_config_inside(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    with pytest.raises(ConfigError, match=r"config file .*run is a directory: pass the path of a YAML file$"):
        load_config(tmp_path / "run")
    (tmp_path / "run" / "config.yaml").write_text("task: causal_lm\n")
    with pytest.raises(ConfigError, match=r"a YAML file \(.*run/config.yaml is the run's\)"):
        load_config(tmp_path / "run")


def test_flow_with_packing_is_refused_by_validate(raw_config) -> None:
    raw_config["data"]["packing"] = True
    raw_config["regularizers"] = [{"name": "l2", "strength": 0.1}, {"name": "flow"}]
    with pytest.raises(ConfigError, match=r"regularizers\[1\]: flow weighs each training row and data.packing"):
        validate_config(raw_config)
