"""Trains the runs listed in a JSON file ([[config, output_dir], ...]) one after the other in every process of a
`torchrun` launch: one process start-up for all the multi-process equivalence runs of tests/test_multiprocess.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from tether.config import validate_config
from tether.distributed import shutdown
from tether.run import train

if __name__ == "__main__":
    torch.set_num_threads(1)  # two processes on two cores
    rank = int(os.environ["RANK"])
    for raw, out in json.loads(Path(sys.argv[1]).read_text()):
        returned = train(validate_config(raw), Path(out))
        Path(f"{out}.rank{rank}.json").write_text(json.dumps(returned))  # beside the run: what each process got
    shutdown()
