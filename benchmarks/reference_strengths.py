"""Strengths of distill, kl, replay, label_smoothing, neftune, ema and wise_ft on the demo world: learned vs forgotten.

    .venv/bin/python benchmarks/reference_strengths.py

Same setting as benchmarks/strengths.py: the demo's cached tiny Llama (pre-trained on invented facts) fine-tuned on
arithmetic with the demo's settings (lr 1.5e-3, 200 steps, batch 16), once per row, one thread. ema and wise_ft rows
report their alternative model (model_ema/, model_wise_ft/ at the chosen alpha).
"""

from __future__ import annotations

from typing import Any

from strengths import row, sweep_runs  # the sibling script: run as python benchmarks/<script>.py

SWEEP: list[tuple[str, list[dict[str, Any]]]] = [
    ("plain", []),
    *[(f"kl {s}", [{"name": "kl", "strength": s}]) for s in (0.1, 1, 10)],
    *[(f"distill {s}", [{"name": "distill", "strength": s}]) for s in (0.5, 2, 10)],
    *[(f"replay {r}", [{"name": "replay", "ratio": r}]) for r in (0.1, 0.25)],
    ("replay 0.1 by tokens", [{"name": "replay", "ratio": 0.1, "by": "tokens"}]),
    ("replay 0.1 + distill 1", [{"name": "replay", "ratio": 0.1}, {"name": "distill", "strength": 1}]),
    ("replay 0.1 + kl 1", [{"name": "replay", "ratio": 0.1}, {"name": "kl", "strength": 1}]),
    ("label_smoothing 0.1", [{"name": "label_smoothing", "strength": 0.1}]),
    ("neftune 5", [{"name": "neftune", "alpha": 5}]),
    ("ema 0.99", [{"name": "ema", "decay": 0.99}]),
    ("wise_ft (least_forgetting, 5%)", [{"name": "wise_ft"}]),
]


def main() -> None:
    for name, m in sweep_runs(SWEEP, "tether-reference-strengths-"):
        if "ema" in m:
            print(row("ema 0.99: the average (model_ema/)", m["ema"]), flush=True)
        if "wise_ft" in m:
            before = m["forgetting"]["recall_before"]
            for r in m["wise_ft"]["alphas"]:
                recall = f"{before:.0%} -> {r['recall']:.0%}"
                print(f"| wise_ft alpha {r['alpha']:g} | {r['val_loss']:.3f} | {recall} | {r['delta_loss']:+.3f} |")
            print(f"| wise_ft: chose alpha {m['wise_ft']['chosen_alpha']:g} | | | |")
            continue
        print(row(name, m), flush=True)


if __name__ == "__main__":
    main()
