"""What tracking forgetting at every evaluation costs: the demo's plain fine-tune with evaluation.track off and on.

    .venv/bin/python benchmarks/tracking_cost.py [--repeats 2]

200 steps, 5 evaluations, 200 measured facts (loss and greedy recall at each evaluation) and a 32-row KL probe; one
thread. Prints the training loop's time (metrics.json train_runtime_s) of each run, alternating off and on.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from tether.config import validate_config
from tether.harness.demo import demo_config
from tether.run import train
from tether.synthetic import pretrained_base


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    repeats = parser.parse_args().repeats
    torch.set_num_threads(1)
    base = pretrained_base()
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for track in (False, True):
                raw = demo_config(base, [])
                raw["evaluation"]["track"] = track
                m = train(validate_config(raw), Path(tmp) / "run", overwrite=True)
                print(f"track {str(track).lower():5}: training loop {m['train_runtime_s']:.2f} s", flush=True)


if __name__ == "__main__":
    main()
