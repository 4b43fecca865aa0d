"""intruder (post-hoc intruder-dimension reduction of a LoRA adapter) on the demo world: the trained adapter (model/)
against its reduced copy (model_intruder/) at several lambdas, from one LoRA run each.

    .venv/bin/python -m benchmarks.intruder

The demo's fine-tune (benchmarks/strengths.py) through LoRA r 16 on every linear layer at lr 1e-2.
"""

from __future__ import annotations

from benchmarks.strengths import row, sweep_runs
from tether.harness.demo import demo_config
from tether.synthetic import pretrained_base

LAMBDAS = (0.75, 0.5, 0.0)


def main() -> None:
    runs = [(f"lambda {lam}", [{"name": "intruder", "mitigation": lam, "threshold": 0.5}]) for lam in LAMBDAS]
    training = demo_config(pretrained_base(), [])["training"] | {"learning_rate": 1e-2}
    for name, m in sweep_runs(runs, "tether-intruder-", lora={"r": 16}, training=training):
        if name == runs[0][0]:
            print(row("LoRA, trained adapter (model/)", m), flush=True)
        print(row(f"intruder {name} ({m['intruder']['changed_factors']} factors changed)", m["intruder"]), flush=True)


if __name__ == "__main__":
    main()
