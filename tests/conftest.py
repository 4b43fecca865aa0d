"""Shared fixtures: small generated datasets and a config mapping for a tiny synthetic model."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

torch.set_num_threads(1)  # tiny models gain nothing from a second thread, and lose much when the CPU is shared


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def addition_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [
        {"prompt": f"{a}+{b}=", "completion": str(a + b)}
        for a, b in ((rng.randrange(50), rng.randrange(50)) for _ in range(n))
    ]


def write_data_files(root: Path) -> dict[str, Path]:
    """Arithmetic train/validation rows and a small fact set as reference data, as JSONL files under `root`."""
    facts = [{"prompt": f"The color of item {i} is", "completion": f" c{i % 5}."} for i in range(12)]
    return {
        "train": write_jsonl(root / "train.jsonl", addition_rows(48, 0)),
        "validation": write_jsonl(root / "val.jsonl", addition_rows(16, 1)),
        "reference": write_jsonl(root / "facts.jsonl", facts),
    }


@pytest.fixture
def data_files(tmp_path: Path) -> dict[str, Path]:
    return write_data_files(tmp_path)


@pytest.fixture
def raw_config(data_files: dict[str, Path], tmp_path: Path) -> dict[str, Any]:
    return {
        "model": {"synthetic": {"arch": "llama", "hidden_size": 32, "num_layers": 2, "num_heads": 4}},
        "task": "causal_lm",
        "data": {k: str(v) for k, v in data_files.items()} | {"format": "prompt_completion", "max_length": 32},
        "training": {"learning_rate": 3e-3, "max_steps": 20, "per_device_train_batch_size": 8, "eval_steps": 10},
        "regularizers": [{"name": "weight_decay", "strength": 0.01}, {"name": "l2", "strength": 1e-4}],
        "output_dir": str(tmp_path / "run"),
    }


def pytest_terminal_summary(terminalreporter):
    """Bad-input fuzzing reports how many generated cases it threw at validate and train."""
    fuzz = sys.modules.get("tests.test_fuzz")
    if fuzz is not None and fuzz.CASES:
        terminalreporter.write_line(f"fuzzed bad-input cases tried: {fuzz.CASES}")
