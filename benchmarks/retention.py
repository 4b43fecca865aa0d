"""Forgetting measured leak-free on the demo world, with lm-evaluation-harness beside tether's own measures.

    .venv/bin/python benchmarks/retention.py

Every run measures the same 200 of the demo world's 400 facts (evaluation.reference_holdout 0.5, tether.roles). The
regularizers that read reference data read either the other 200 (the default) or all 400, the measured ones
included (evaluation.train_on_measured: flagged in metrics.json), so the table shows how much reading the measured
rows flatters them. lm-eval's score is the tether_facts multiple-choice task (tether.lmeval) built from the measured
facts, run in memory and offline on the base model and on the result. One thread, the demo's settings.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from tether.config import validate_config
from tether.data import load_split
from tether.harness.demo import demo_config
from tether.lmeval import TASK_NAME, write_task_pack
from tether.roles import assign_roles
from tether.run import train
from tether.synthetic import pretrained_base

RUNS: list[tuple[str, list[dict[str, Any]], bool]] = [  # name, regularizers, train_on_measured
    ("plain", [], False),
    ("replay 0.1", [{"name": "replay", "ratio": 0.1}], False),
    ("replay 0.1", [{"name": "replay", "ratio": 0.1}], True),
    ("ewc 0.3", [{"name": "ewc", "strength": 0.3}], False),
    ("ewc 0.3", [{"name": "ewc", "strength": 0.3}], True),
    ("l2_sp 10 + replay 0.1 (demo)", [{"name": "l2_sp", "strength": 10.0}, {"name": "replay", "ratio": 0.1}], False),
]


def measured_facts(raw: dict[str, Any], tokenizer: Any) -> list[dict[str, Any]]:
    cfg = validate_config(raw)
    split = load_split(cfg.data.reference, "reference", "prompt_completion", cfg.task, tokenizer, cfg.data.max_length)
    return assign_roles(cfg, split).measured.rows


def main() -> None:
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    base = pretrained_base()
    tokenizer = AutoTokenizer.from_pretrained(base.model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        pack = write_task_pack(Path(tmp) / "tasks", measured_facts(demo_config(base, []), tokenizer))
        print("| run | reads | target val loss | recall after | facts' loss + | lm-eval acc before -> after |")
        print("| --- | --- | --- | --- | --- | --- |")
        for i, (name, regularizers, on_measured) in enumerate(RUNS):
            raw = demo_config(base, regularizers)
            raw["evaluation"].update(train_on_measured=on_measured)
            raw["evaluation"]["lm_eval"] = {"tasks": [TASK_NAME], "include_path": str(pack)}
            m = train(validate_config(raw), Path(tmp) / f"run-{i}", overwrite=True)
            f, acc = m["forgetting"], m["lm_eval"][TASK_NAME]["acc"]
            roles = m["reference_roles"]
            reads = "-" if not roles["readers"] else ("all 400 facts" if on_measured else "the other 200 facts")
            print(
                f"| {name} | {reads} | {m['target']['val_loss']:.3f} | {f['recall_after']:.0%} | "
                f"{f['delta_loss']:+.3f} | {acc['before']:.3f} -> {acc['after']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
