"""LoRA starts on the demo world: PEFT's default (B = 0) against CorDA's knowledge-preserved and instruction-previewed
starts (lora.init corda_kpm / corda_ipm), all r 16 on every linear layer at lr 1e-2.

    .venv/bin/python -m benchmarks.adapters

The demo's fine-tune (benchmarks/strengths.py); corda_kpm calibrates on the reference rows held out of the
measurement (evaluation.reference_holdout 0.5 in the demo config), corda_ipm on the training rows.
"""

from __future__ import annotations

from benchmarks.strengths import row, sweep_runs
from tether.harness.demo import demo_config
from tether.synthetic import pretrained_base

INITS = ("default", "corda_kpm", "corda_ipm")


def main() -> None:
    training = demo_config(pretrained_base(), [])["training"] | {"learning_rate": 1e-2}
    for init in INITS:
        runs = [(f"LoRA r 16, init {init}", [])]
        for name, m in sweep_runs(runs, f"tether-adapters-{init}-", lora={"r": 16, "init": init}, training=training):
            print(row(name, m), flush=True)


if __name__ == "__main__":
    main()
