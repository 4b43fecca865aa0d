"""mofo (top-α momentum-filtered Adam) against plain fine-tuning on the demo world: what is learned vs forgotten.

    .venv/bin/python -m benchmarks.mofo

Same runs as benchmarks/strengths.py (the demo's tiny Llama pre-trained on invented facts, fine-tuned on arithmetic,
lr 1e-3, 200 steps), one row per fraction α. One thread, a few seconds a run.
"""

from __future__ import annotations

from typing import Any

from benchmarks.strengths import row, sweep_runs

SWEEP: list[tuple[str, list[dict[str, Any]]]] = [
    ("plain", []),
    *[(f"mofo {a}", [{"name": "mofo", "fraction": a}]) for a in (0.05, 0.1, 0.2)],
    ("mofo 0.1 + l2_sp 10", [{"name": "mofo", "fraction": 0.1}, {"name": "l2_sp", "strength": 10}]),
]


def main() -> None:
    for name, m in sweep_runs(SWEEP, "tether-mofo-"):
        print(row(name, m), flush=True)


if __name__ == "__main__":
    main()
