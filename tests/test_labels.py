"""Classification labels: num_labels from the data, class names saved as id2label, bad labels as one line naming
file:line (train and validate alike), accuracy and F1 at every evaluation, the shipped example config."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from tether.config import DataConfig, load_config, validate_config
from tether.data import Labels, label_space, run_labels
from tether.errors import ConfigError, DataError
from tether.run import evaluate_saved, train

from .conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def data_of(tmp_path: Path, train_labels: list, val_labels: list | None = None) -> DataConfig:
    train = write_jsonl(
        tmp_path / "train.jsonl", [{"text": f"row {i}", "label": v} for i, v in enumerate(train_labels)]
    )
    val = None
    if val_labels is not None:
        val = write_jsonl(tmp_path / "val.jsonl", [{"text": f"v {i}", "label": v} for i, v in enumerate(val_labels)])
    return DataConfig(train=str(train), validation=None if val is None else str(val), format="text")


def test_num_labels_and_names_come_from_the_data(tmp_path):
    assert label_space(data_of(tmp_path, [0, 3, 1], [2]), None) == Labels(4)
    assert label_space(data_of(tmp_path, ["pos", "neg"], ["mixed"]), None) == Labels(3, ("mixed", "neg", "pos"))
    assert label_space(data_of(tmp_path, [0, 1]), 5) == Labels(5)  # a class without rows yet


@pytest.mark.parametrize(
    ("train_labels", "val_labels", "num_labels", "expected"),
    [
        ([0, 1, 4], None, 3, r"train.jsonl:3: label 4 is out of range for 3 classes \(0..2\)"),
        ([0, 1], [1, 2], 2, r"val.jsonl:2: label 2 is out of range for 2 classes"),
        ([0, -100, 1], None, None, r"train.jsonl:2: label -100 is not a class"),
        ([0, -1], None, None, r"train.jsonl:2: label -1 is negative"),
        ([0, True], None, None, r"train.jsonl:2: 'label' must be a class id"),
        ([0, "pos"], None, None, r"train.jsonl:2: label 'pos': the data mixes class names and ids"),
        (["a", "b"], None, 3, r"the data names 2 classes \(a, b\) but model.num_labels is 3"),
        ([0, 0], None, None, r"the data has a single class"),
    ],
)
def test_bad_labels_are_one_line_naming_the_row(tmp_path, train_labels, val_labels, num_labels, expected):
    with pytest.raises(DataError, match=expected):
        label_space(data_of(tmp_path, train_labels, val_labels), num_labels)


def test_a_missing_label_names_the_row(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0}, {"text": "b"}])
    with pytest.raises(DataError, match=r"data.train: .*train.jsonl:2: missing field 'label'"):
        label_space(DataConfig(train=str(tmp_path / "train.jsonl"), format="text"), None)


def classification_config(tmp_path: Path, labels: list, **extra) -> dict:
    texts = ["good", "bad", "fine", "odd"]
    rows = [{"text": f"{texts[i % 4]} {i}", "label": labels[i % len(labels)]} for i in range(24)]
    return {
        "model": {"synthetic": {"arch": "bert", "hidden_size": 32, "num_layers": 1, "num_heads": 4}},
        "task": "sequence_classification",
        "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", rows)), "format": "text", "max_length": 16},
        "training": {"learning_rate": 3e-3, "max_steps": 6, "per_device_train_batch_size": 8, "eval_steps": 2},
        "output_dir": str(tmp_path / "run"),
        **extra,
    }


def test_string_labels_are_saved_as_names_and_scored_at_every_evaluation(tmp_path):
    raw = classification_config(tmp_path, ["neg", "pos", "mixed"])
    raw["early_stopping"] = {"metric": "eval_accuracy", "mode": "max", "patience": 5}
    metrics = train(validate_config(raw), tmp_path / "run")
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "mixed", "1": "neg", "2": "pos"}
    assert config["label2id"] == {"mixed": 0, "neg": 1, "pos": 2}
    evaluations = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    evaluations = [e for e in evaluations if "eval_loss" in e]
    assert len(evaluations) == 3 and all({"eval_accuracy", "eval_f1"} <= e.keys() for e in evaluations)
    assert 0 <= metrics["target"]["accuracy"] <= 1
    # the saved model scores a file with a subset of the classes by its own names, not the file's
    subset = write_jsonl(tmp_path / "pos.jsonl", [{"text": "good 1", "label": "pos"}])
    scored = evaluate_saved(validate_config(raw), tmp_path / "run" / "model", data_file=subset)
    assert scored["data"] == str(subset) and scored["rows"] == 1 and set(scored) >= {"loss", "accuracy", "f1"}


def test_accuracy_for_early_stopping_is_refused_for_a_language_model(raw_config):
    raw_config["early_stopping"] = {"metric": "eval_accuracy", "mode": "max"}
    with pytest.raises(ConfigError, match="eval_accuracy is measured for task sequence_classification only"):
        validate_config(raw_config)


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    from tether.cli import main

    monkeypatch.setattr(sys, "argv", ["tether", *args])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code, capsys.readouterr().err


def test_an_out_of_range_label_stops_train_and_validate_with_one_line(tmp_path, monkeypatch, capsys):
    raw = classification_config(tmp_path, [0, 1, 2])
    raw["model"]["num_labels"] = 2
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    for command in ("validate", "train"):
        code, err = cli(monkeypatch, capsys, command, str(path))
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "train.jsonl:3: label 2 is out of range for 2 classes" in err
    assert not (tmp_path / "run").exists()


def test_the_shipped_classification_example_validates_and_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "examples" / "classification.yaml", ["training.max_steps=4", "training.eval_steps=2"])
    metrics = train(cfg, tmp_path / "run")
    assert set(metrics["target"]) >= {"accuracy", "f1"}
    assert len(json.loads((tmp_path / "run" / "model" / "config.json").read_text())["id2label"]) == 4


def test_a_pretrained_classifier_keeps_its_own_class_order(tmp_path):
    from tether.synthetic import char_tokenizer, tiny_model

    tok = char_tokenizer()
    model = tiny_model("bert", "sequence_classification", len(tok), num_labels=3, pad_token_id=0)
    model.config.id2label, model.config.label2id = {0: "pos", 1: "neg", 2: "mixed"}, {"pos": 0, "neg": 1, "mixed": 2}
    model.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    raw = classification_config(tmp_path, ["neg", "pos"])
    raw["model"] = {"path": str(tmp_path / "clf")}
    cfg = validate_config(raw)
    assert run_labels(cfg) == Labels(3, ("pos", "neg", "mixed"))  # its head's rows keep their meaning
    train(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert saved["id2label"] == {"0": "pos", "1": "neg", "2": "mixed"}
    other = classification_config(tmp_path, ["neg", "odd"])  # a name the classifier lacks: the data's own classes
    other["model"] = {"path": str(tmp_path / "clf")}
    assert run_labels(validate_config(other)) == Labels(2, ("neg", "odd"))


def test_another_file_of_the_run_is_read_with_the_runs_classes(tmp_path):
    """replay.source / ewc.data in a classification run: a file holding some of the classes gets the run's ids."""
    from tether.run import _reader
    from tether.synthetic import char_tokenizer

    cfg = validate_config(classification_config(tmp_path, ["neg", "pos", "mixed"]))
    subset = write_jsonl(tmp_path / "pos.jsonl", [{"text": "good 1", "label": "pos"}])
    rows = _reader(cfg, char_tokenizer(), run_labels(cfg))(str(subset))
    assert [r["labels"] for r in rows] == [2]  # "pos" among mixed, neg, pos; alone in its file it would be 0
