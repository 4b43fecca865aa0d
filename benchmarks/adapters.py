"""Adapters on the demo world at lr 1e-2: LoRA r 16 from PEFT's default start (B = 0) against CorDA's
knowledge-preserved and instruction-previewed starts (lora.init corda_kpm / corda_ipm), and PEFT's OSF (orthogonal
subspace fine-tuning) with half or three quarters of each weight's singular directions frozen; all on every linear
layer, with full fine-tuning at the same lr for comparison.

    .venv/bin/python -m benchmarks.adapters

The demo's fine-tune (benchmarks/strengths.py); corda_kpm calibrates on the reference rows held out of the
measurement (evaluation.reference_holdout 0.5 in the demo config), corda_ipm on the training rows.
"""

from __future__ import annotations

from typing import Any

from benchmarks.strengths import row, sweep_runs
from tether.harness.demo import demo_config
from tether.synthetic import pretrained_base

RUNS: list[tuple[str, dict[str, Any]]] = [
    ("full fine-tuning", {}),
    *[
        (f"LoRA r 16, init {init}", {"lora": {"r": 16, "init": init}})
        for init in ("default", "corda_kpm", "corda_ipm")
    ],
    *[(f"OSF effective_rank {rank}", {"osf": {"effective_rank": rank}}) for rank in (0.5, 0.75)],
]


def main() -> None:
    training = demo_config(pretrained_base(), [])["training"] | {"learning_rate": 1e-2}
    for i, (run, sections) in enumerate(RUNS):  # sections replace the demo config's (lora, osf)
        for name, m in sweep_runs([(run, [])], f"tether-adapters-{i}-", training=training, **sections):
            print(row(name, m), flush=True)


if __name__ == "__main__":
    main()
