"""The measured reference rows are never trained on unless asked; what replay and ewc read is recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file
from transformers import TrainerCallback

from tests.conftest import write_jsonl
from tether.config import validate_config
from tether.roles import assign_roles
from tether.run import evaluate_saved, train
from tether.synthetic import char_tokenizer


class _TrainRows(TrainerCallback):
    """The rows the Trainer trains on (replay's mix included)."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, ...]] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.rows = [tuple(r["input_ids"]) for r in kwargs["train_dataloader"].dataset]


def _facts(raw: dict[str, Any]) -> list[tuple[int, ...]]:
    from tether.data import load_split

    split = load_split(raw["data"]["reference"], "reference", "prompt_completion", "causal_lm", char_tokenizer(), 32)
    return [tuple(e["input_ids"]) for e in split.encoded]


def _train(raw: dict[str, Any], out: Path) -> tuple[dict[str, Any], set[tuple[int, ...]]]:
    seen = _TrainRows()
    metrics = train(validate_config(raw), out, overwrite=True, callbacks=[seen])
    return metrics, set(seen.rows)


@pytest.fixture
def replay_config(raw_config: dict[str, Any]) -> dict[str, Any]:
    raw_config["regularizers"] = [{"name": "replay", "ratio": 0.5}]
    raw_config["training"].update(max_steps=4, eval_steps=4)
    return raw_config


def test_replay_reads_the_held_out_rows_only(replay_config: dict, tmp_path: Path) -> None:
    cfg = validate_config(replay_config)
    metrics, trained = _train(replay_config, tmp_path / "run")
    roles = metrics["reference_roles"]
    facts = set(_facts(replay_config))
    replayed = trained & facts
    assert roles["measured_rows"] == roles["held_out_rows"] == 6 and not roles["trained_on_measured"]
    assert len(replayed) == 6  # every held-out fact is replayed (48 rows at ratio 0.5: 48 replayed, 8 passes)
    from tether.data import load_split

    ref = load_split(cfg.data.reference, "reference", "prompt_completion", "causal_lm", char_tokenizer(), 32)
    measured = {tuple(e["input_ids"]) for e in assign_roles(cfg, ref).measured.encoded}
    assert not measured & replayed and measured | replayed == facts


def test_training_on_the_measured_rows_is_asked_for_and_flagged(replay_config: dict, tmp_path: Path) -> None:
    replay_config["evaluation"] = {"train_on_measured": True}
    metrics, trained = _train(replay_config, tmp_path / "run")
    roles = metrics["reference_roles"]
    assert roles["trained_on_measured"] and roles["measured_rows"] == 12 and roles["held_out_rows"] == 0
    assert trained >= set(_facts(replay_config))  # all 12, the measured ones included
    assert "trained on the measured" in (tmp_path / "run" / "report.html").read_text()


def test_a_replay_source_that_is_the_reference_file_is_flagged(replay_config: dict, tmp_path: Path) -> None:
    replay_config["regularizers"][0]["source"] = replay_config["data"]["reference"]
    metrics, _ = _train(replay_config, tmp_path / "run")
    assert metrics["reference_roles"]["trained_on_measured"]
    assert metrics["reference_roles"]["measured_rows"] == 12  # replay has its own (same) file: nothing held out


def test_same_holdout_measures_the_same_rows_with_and_without_replay(replay_config: dict, tmp_path: Path) -> None:
    replay_config["evaluation"] = {"reference_holdout": 0.5}
    with_replay, _ = _train(replay_config, tmp_path / "replay")
    replay_config["regularizers"] = []
    plain, _ = _train(replay_config, tmp_path / "plain")
    assert plain["reference_roles"]["measured_rows"] == 6
    assert plain["forgetting"]["reference_loss_before"] == with_replay["forgetting"]["reference_loss_before"]
    cfg = validate_config(replay_config)
    again = evaluate_saved(cfg, tmp_path / "plain" / "model")  # tether eval measures the run's rows
    assert again["reference"]["loss"] == pytest.approx(plain["forgetting"]["reference_loss_after"], abs=1e-6)


def test_ewc_data_is_the_fisher_of_that_file(raw_config: dict, tmp_path: Path) -> None:
    other = write_jsonl(
        tmp_path / "other.jsonl", [{"prompt": f"Item {i} sits in", "completion": f" r{i}."} for i in range(8)]
    )
    raw_config["training"].update(max_steps=2, eval_steps=2)
    raw_config["regularizers"] = [{"name": "ewc", "strength": 0.3, "data": str(other)}]
    own, _ = _train(raw_config, tmp_path / "own")
    assert own["reference_roles"]["measured_rows"] == 12  # ewc has its own data: every fact is measured
    assert own["reference_roles"]["readers"] == {"ewc": str(other)}
    raw_config["regularizers"] = [{"name": "ewc", "strength": 0.3}]
    raw_config["data"]["reference"] = str(other)
    raw_config["evaluation"] = {"train_on_measured": True}
    _train(raw_config, tmp_path / "as_reference")
    a, b = (
        load_file(tmp_path / "own" / "fisher.safetensors"),
        load_file(tmp_path / "as_reference" / "fisher.safetensors"),
    )
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_who_reads_the_reference(raw_config: dict, tmp_path: Path) -> None:
    from tether.data import Split

    rows = [{"prompt": str(i), "completion": str(i)} for i in range(10)]
    ref = Split(rows, [{"input_ids": [i]} for i in range(10)], "prompt_completion")
    fisher = tmp_path / "f.safetensors"
    fisher.write_bytes(b"")
    raw_config["data"]["seed"] = 3
    raw_config["regularizers"] = [{"name": "si"}, {"name": "ewc", "fisher_path": str(fisher)}, {"name": "l2_sp"}]
    roles = assign_roles(validate_config(raw_config), ref)
    assert roles.record["readers"] == {"si": "the held-out rows of data.reference (5 rows)"}  # ewc: its saved Fisher
    assert len(roles.measured.rows) == len(roles.regularizers.rows) == 5
    assert sorted(r["prompt"] for r in roles.measured.rows + roles.regularizers.rows) == sorted(
        r["prompt"] for r in rows
    )
    again = assign_roles(validate_config(raw_config), ref)  # seeded: the same split every time (and in tether eval)
    assert [r["prompt"] for r in again.measured.rows] == [r["prompt"] for r in roles.measured.rows]
    raw_config["regularizers"] = [{"name": "l2_sp"}]
    alone = assign_roles(validate_config(raw_config), ref)
    assert alone.measured is ref and alone.regularizers is None and alone.record["held_out_rows"] == 0


def test_the_windows_of_a_long_reference_row_stay_on_one_side() -> None:
    """A text row split into windows is measured or held out whole: a window on each side would let the regularizers
    read text that the measurement scores."""
    from tether.config import RunConfig
    from tether.data import Split

    rows = [{"text": f"row {i}"} for i in range(6)]
    windows = [rows[i // 3] if i < 6 else rows[i - 4] for i in range(10)]  # rows 0 and 1 have 3 windows each
    split = Split(windows, [{"input_ids": [i]} for i in range(10)], "text")
    raw = {"model": {"synthetic": {"arch": "llama"}}, "data": {"train": "t.jsonl", "reference": "r.jsonl"},
           "regularizers": [{"name": "replay"}], "evaluation": {"reference_holdout": 0.5}}  # fmt: skip
    for seed in range(8):
        roles = assign_roles(RunConfig.model_validate(raw | {"data": raw["data"] | {"seed": seed}}), split)
        measured = {id(r) for r in roles.measured.rows}
        held = {id(r) for r in roles.regularizers.rows}
        assert not measured & held


def test_rows_are_counted_as_rows_and_duplicates_across_the_split_are_flagged(raw_config: dict) -> None:
    """reference_roles counts rows (a windowed row once) beside the examples they make, and a row that
    data.reference holds twice, once on each side of the split, is measured after the regularizers read it."""
    from tether.data import Split

    rows = [{"text": str(i)} for i in range(6)]
    windows = [row for row in rows for _ in range(3)]  # each row windowed into 3 examples
    ref = Split(windows, [{"input_ids": [i, w]} for i in range(6) for w in range(3)], "text")
    raw_config["regularizers"] = [{"name": "replay", "ratio": 0.5}]
    record = assign_roles(validate_config(raw_config), ref).record
    assert (record["measured_rows"], record["measured_examples"], record["held_out_rows"]) == (3, 9, 3)
    assert record["readers"] == {"replay": "the held-out rows of data.reference (3 rows, 9 examples)"}
    assert record["measured_examples_read"] == 0 and not record["trained_on_measured"]
    twice = [{"text": "same"}, {"text": "same"}, *rows]  # equal rows, two objects: each side of some split
    ref = Split(twice, [{"input_ids": [7]}, {"input_ids": [7]}] + [{"input_ids": [i]} for i in range(6)], "text")
    for seed in range(20):  # a seed that puts the two on different sides
        raw_config["data"]["seed"] = seed
        roles = assign_roles(validate_config(raw_config), ref)
        if [r["text"] for r in roles.measured.rows].count("same") == 1:
            break
    assert roles.record["measured_examples_read"] == 1 and roles.record["trained_on_measured"]
