"""1 vs 2 processes (torchrun, gloo on CPU): time per optimizer step at the same global batch. (Not named
multiprocess.py: run as a script, that name would shadow the `multiprocess` package that `datasets` imports.)

    .venv/bin/python benchmarks/processes.py [--steps 60] [--hidden 128]

Both runs train the same tiny Llama on the bundled arithmetic data with the same global batch (16 = 1 x 16 = 2 x 8),
one torch thread per process, no evaluation or checkpoint during training; the time is the Trainer's train_runtime
over the steps. Prints seconds per step for each and the ratio, for plain training and with l2_sp + ewc.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def config(hidden: int, steps: int, batch: int, regularizers: list[dict]) -> dict:
    return {
        "model": {"synthetic": {"arch": "llama", "hidden_size": hidden, "num_layers": 4, "num_heads": 4}},
        "data": {
            "train": "examples/data/add_train.jsonl", "validation": "examples/data/add_val.jsonl",
            "reference": "examples/data/facts.jsonl", "format": "prompt_completion", "max_length": 32,
        },
        "training": {
            "learning_rate": 1e-3, "max_steps": steps, "per_device_train_batch_size": batch,
            "eval_strategy": "no", "save_strategy": "no", "logging_steps": steps,
        },
        "regularizers": regularizers,
    }  # fmt: skip


def seconds_per_step(cfg: dict, processes: int, work: Path) -> float:
    path, out = work / f"c{processes}.yaml", work / f"run{processes}"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launcher = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={processes}"]
    cmd = [*launcher, "-m", "tether", "train", str(path), "--output-dir", str(out), "--overwrite"]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True)
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    final = next(r for r in rows if "train_runtime" in r)
    return final["train_runtime"] / cfg["training"]["max_steps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--hidden", type=int, default=128)
    a = parser.parse_args()
    cases = {"plain": [], "l2_sp + ewc": [{"name": "l2_sp", "strength": 5.0}, {"name": "ewc", "strength": 0.3}]}
    with tempfile.TemporaryDirectory() as tmp:
        for name, regs in cases.items():
            one = seconds_per_step(config(a.hidden, a.steps, 16, regs), 1, Path(tmp))
            two = seconds_per_step(config(a.hidden, a.steps, 8, regs), 2, Path(tmp))
            print(f"{name:12s} 1 process {one * 1e3:6.1f} ms/step   2 processes {two * 1e3:6.1f} ms/step   "
                  f"ratio 2/1 {two / one:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
