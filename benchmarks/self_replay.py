"""self_replay against replay of real rows and plain fine-tuning on the demo world, 3 seeds.

    .venv/bin/python -m benchmarks.self_replay [--seeds 3]

Seed s pre-trains the demo's tiny Llama on world s (cached) and fine-tunes it on arithmetic with the demo's settings
(training seed s). replay mixes in real facts (the held-out half of the reference, as in the demo); self_replay
mixes in rows the base model wrote: continuations of the held-out facts' prompts (`prompts: reference`), or text
from its BOS token (`prompts: bos`, no data at all). Every run is measured on the other half of the facts. Mean and
sample standard deviation over the seeds; kept: the generated rows that passed the filters. One thread.
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
from tether.synthetic import pretrained_base

RUNS: list[tuple[str, list[dict[str, Any]]]] = [
    ("plain", []),
    *[(f"replay {r}", [{"name": "replay", "ratio": r}]) for r in (0.1, 0.25)],
    *[(f"self_replay reference {r}", [{"name": "self_replay", "ratio": r}]) for r in (0.1, 0.25)],
    ("self_replay bos 0.25", [{"name": "self_replay", "ratio": 0.25, "prompts": "bos"}]),
]


def spread(values: list[float], fmt: str) -> str:
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt.lstrip('+'))}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix="tether-self-replay-"))
    print("| run | target val loss | recall after | reference loss + | kept / generated |")
    print("| --- | --- | --- | --- | --- |")
    for name, regularizers in RUNS:
        results = []
        for seed in range(args.seeds):
            raw = demo_config(pretrained_base(seed=seed), regularizers)
            raw["training"].update(eval_strategy="no", save_strategy="no", seed=seed)
            results.append(train(validate_config(raw), out / name.replace(" ", "_") / f"seed-{seed}", overwrite=True))
        val = spread([m["target"]["val_loss"] for m in results], ".3f")
        recall = spread([100 * m["forgetting"]["recall_after"] for m in results], ".0f")
        delta = spread([m["forgetting"]["delta_loss"] for m in results], "+.3f")
        made = [m["self_replay"] for m in results if "self_replay" in m]
        kept = f"{sum(c['kept'] for c in made)} / {sum(c['generated'] for c in made)}" if made else "-"
        print(f"| {name} | {val} | {recall} % | {delta} | {kept} |", flush=True)


if __name__ == "__main__":
    main()
