"""merge against global WiSE-FT on the demo world, 3 seeds: how much forgetting each recovers at the same target cost.

    .venv/bin/python -m benchmarks.merge [--seeds 3]

Seed s pre-trains the demo's tiny Llama on world s (tether.synthetic.pretrained_base, cached) and fine-tunes it on
arithmetic with the demo's settings (training seed s), with `merge` (alphas ALPHAS, otherwise the defaults) and `ewc`
at strength 0, which only estimates the Fisher that merge's fisher candidates read. The band is the choice rule's:
the candidates within 5 % of the best target val loss among all of them. In it, WiSE-FT's best is the global alpha
with the least forgetting, merge's best the least forgetting among every candidate (what model_merge/ saves);
recovered is 1 - F / F(fine-tuned), F the reference (facts') loss increase. One thread; about a minute a seed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from tether.config import validate_config
from tether.harness.demo import demo_config
from tether.run import train
from tether.selection import within_tolerance
from tether.synthetic import pretrained_base

TOLERANCE = 0.05  # merge's default: the band of target loss a candidate may cost
ALPHAS = [0, 0.5, 0.75, 0.85, 0.9, 0.95, 1]  # finer near 1 than the default, so WiSE-FT has points in the band


def run(seed: int, out: Path) -> dict[str, Any]:
    base = pretrained_base(seed=seed)
    raw = demo_config(
        base, [{"name": "ewc", "strength": 0.0}, {"name": "merge", "tolerance": TOLERANCE, "alphas": ALPHAS}]
    )
    raw["training"].update(eval_strategy="no", save_strategy="no", seed=seed)
    return train(validate_config(raw), out / f"seed-{seed}", overwrite=True)


def best_in_band(rows: list[dict[str, Any]], band: list[dict[str, Any]]) -> dict[str, Any]:
    inside = [r for r in rows if r in band]
    return min(inside, key=lambda r: r["delta_loss"]) if inside else {}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix="tether-merge-"))
    print("| seed | fine-tuned: val / F | WiSE-FT best in band | recovered | merge best in band | recovered |")
    print("| --- | --- | --- | --- | --- | --- |")
    recovered: dict[str, list[float | None]] = {}
    for seed in range(args.seeds):
        rows = run(seed, out)["merge"]["candidates"]
        band = within_tolerance(rows, lambda r: r["val_loss"], TOLERANCE)
        tuned = next(r for r in rows if r["candidate"] == "global 1")
        for label in ("global", "layers", "dare", "ties", "fisher", "merge (best of all)"):
            best = best_in_band([r for r in rows if label in (r["method"], "merge (best of all)")], band)
            recovered.setdefault(label, []).append(1 - best["delta_loss"] / tuned["delta_loss"] if best else None)
        wise, merged = best_in_band([r for r in rows if r["method"] == "global"], band), best_in_band(rows, band)
        print(
            f"| {seed} | {tuned['val_loss']:.3f} / {tuned['delta_loss']:+.3f} | {wise['candidate']}: "
            f"{wise['val_loss']:.3f} / {wise['delta_loss']:+.3f} | {recovered['global'][-1]:.0%} | "
            f"{merged['candidate']}: {merged['val_loss']:.3f} / {merged['delta_loss']:+.3f} | "
            f"{recovered['merge (best of all)'][-1]:.0%} |",
            flush=True,
        )
    print(
        "\n| candidates | forgetting recovered in the band, each seed (-: no candidate in the band) |\n| --- | --- |"
    )
    for method, values in recovered.items():
        print(f"| {method} | {', '.join('-' if v is None else f'{v:.0%}' for v in values)} |")
    wise, merged = (statistics.mean(recovered[k]) for k in ("global", "merge (best of all)"))  # never None
    verdict = "PASS" if merged > wise else "FAIL"
    print(
        f"\n{verdict}  the best merge candidate recovers more of the forgetting than global WiSE-FT within "
        f"{TOLERANCE:.0%} of the best target loss: {merged:.0%} vs {wise:.0%} (mean of {args.seeds} seeds)"
    )


if __name__ == "__main__":
    main()
