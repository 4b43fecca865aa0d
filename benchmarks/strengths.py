"""Strength sweep of the parameter-space regularizers on the demo world: what is learned vs what is forgotten.

    .venv/bin/python benchmarks/strengths.py

The demo's cached tiny Llama (pre-trained on invented facts) is fine-tuned on arithmetic with the demo's settings
(lr 1e-3, 200 steps, batch 16), once per row; the table gives the target validation loss (lower: learned more) and
the fact recall and reference loss change (what was forgotten). One thread, about 4 s a run.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tether.config import validate_config
from tether.harness.demo import demo_config
from tether.run import train
from tether.synthetic import pretrained_base

SWEEP: list[tuple[str, list[dict[str, Any]]]] = [
    ("plain", []),
    *[(f"l2_sp decoupled {s}", [{"name": "l2_sp", "strength": s}]) for s in (1, 3, 10, 30, 100)],
    *[(f"l2_sp penalty {s}", [{"name": "l2_sp", "form": "penalty", "strength": s}]) for s in (0.01, 0.03, 0.1, 1)],
    *[(f"ewc {s}", [{"name": "ewc", "strength": s}]) for s in (0.1, 0.3, 1, 10)],
    ("ewc 1 empirical", [{"name": "ewc", "strength": 1, "estimator": "empirical"}]),
    ("ewc 1 exact", [{"name": "ewc", "strength": 1, "estimator": "exact"}]),
    *[(f"si {s}", [{"name": "si", "strength": s}]) for s in (0.1, 0.3, 1, 10)],
    *[(f"l1 {s}", [{"name": "l1", "strength": s}]) for s in (1e-4, 1e-3)],
    ("llrd 0.8", [{"name": "llrd", "decay": 0.8}]),
]


def row(name: str, m: dict[str, Any]) -> str:
    f = m["forgetting"]
    recall = f"{f['recall_before']:.0%} -> {f['recall_after']:.0%}"
    return f"| {name} | {m['target']['val_loss']:.3f} | {recall} | {f['delta_loss']:+.3f} |"


def sweep_runs(
    sweep: list[tuple[str, list[dict[str, Any]]]], prefix: str, **sections: Any
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, metrics) of one demo fine-tune per entry, after printing the table header (also for the other
    benchmarks of the demo world); `sections` replace the demo config's (e.g. lora={...})."""
    torch.set_num_threads(1)  # tiny matrices: a second thread gains little and suffers most from other processes
    base = pretrained_base()
    out = Path(tempfile.mkdtemp(prefix=prefix))
    print("| run | target val loss | fact recall | reference loss + |\n| --- | --- | --- | --- |")
    for name, regularizers in sweep:
        raw = demo_config(base, regularizers) | sections
        raw["training"].update(eval_strategy="no", save_strategy="no")
        yield name, train(validate_config(raw), out / name.replace(" ", "_"), overwrite=True)


def main() -> None:
    for name, m in sweep_runs(SWEEP, "tether-strengths-"):
        print(row(name, m), flush=True)


if __name__ == "__main__":
    main()
