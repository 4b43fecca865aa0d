"""Token- and row-reweighted losses (dft, eaft, flow, asft) vs plain fine-tuning on the demo world.

    .venv/bin/python benchmarks/loss_shaping.py

Same runs as benchmarks/strengths.py (the demo's tiny Llama pre-trained on invented facts, fine-tuned on arithmetic,
lr 1e-3, 200 steps), one row per setting. One thread, a few seconds a run.
"""

from __future__ import annotations

from typing import Any

from benchmarks.strengths import row, sweep_runs

SWEEP: list[tuple[str, list[dict[str, Any]]]] = [
    ("plain", []),
    *[(f"dft {s}", [{"name": "dft", "strength": s}]) for s in (0.5, 1.0)],
    *[(f"eaft {s}", [{"name": "eaft", "strength": s}]) for s in (0.5, 1.0)],
    ("flow 1 (tau: median)", [{"name": "flow"}]),
    ("flow 1 tau 0.1", [{"name": "flow", "temperature": 0.1}]),
    ("asft (anchor 0.1)", [{"name": "asft", "anchor": 0.1}]),
]


def main() -> None:
    for name, m in sweep_runs(SWEEP, "tether-loss-shaping-"):
        print(row(name, m), flush=True)


if __name__ == "__main__":
    main()
