"""Two processes (torchrun, gloo on CPU) give the run one process gives, for each kind of regularizer.

Same global batch (2 x 4 vs 1 x 8) and seed: accelerate shards each global batch of the one-process sampler over
the processes, the task loss is normalized by the global token count, closed-form penalties and decoupled pulls are
applied to the all-reduced gradients and identical weights, and the EWC Fisher is all-reduced over the processes'
shares of the reference batches. What differs is float summation order, and for kl/distill the per-process token
mean (DDP averages the two processes' means; one process takes the mean over all tokens).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_data_files
from tether.config import validate_config
from tether.run import train

pytestmark = pytest.mark.multiprocess
ROOT = Path(__file__).resolve().parents[1]
KINDS = {
    "plain": [],
    "penalty": [{"name": "l2_sp", "strength": 5.0}, {"name": "ewc", "strength": 0.5}],
    "reference": [{"name": "kl", "strength": 0.5}, {"name": "distill", "strength": 0.5}],
    "data": [{"name": "replay", "ratio": 0.25}],
    "optimizer": [{"name": "weight_decay", "strength": 0.1}, {"name": "llrd", "decay": 0.7}],
}
TOLERANCE = {"atol": 2e-5, "rtol": 1e-4}  # weights after 12 Adam steps: 2e-6..1e-5 measured for every kind


def _raw(data: dict[str, Path], regularizers: list[dict], batch: int) -> dict:
    return {
        "model": {"synthetic": {"arch": "llama", "hidden_size": 32, "num_layers": 2, "num_heads": 4}},
        "data": {k: str(v) for k, v in data.items()} | {"format": "prompt_completion", "max_length": 32},
        "training": {
            "learning_rate": 3e-3, "max_steps": 12, "per_device_train_batch_size": batch, "eval_steps": 6,
            "per_device_eval_batch_size": 4, "save_steps": 6, "logging_steps": 3,
        },
        "regularizers": regularizers,
    }  # fmt: skip


def _can_spawn() -> bool:
    return shutil.which("torchrun", path=str(Path(sys.executable).parent)) is not None


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Every kind trained once with one process (here) and once with two (one torchrun launch for all)."""
    if not _can_spawn():
        pytest.skip("torchrun is not installed next to this Python")
    root = tmp_path_factory.mktemp("ddp")
    data = write_data_files(root)
    jobs = [[_raw(data, regs, 4), str(root / f"two-{kind}")] for kind, regs in KINDS.items()]
    (root / "jobs.json").write_text(json.dumps(jobs))
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(ROOT / "tests" / "ddp_runs.py")]
    proc = subprocess.run(
        [*cmd, str(root / "jobs.json")], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for kind, regs in KINDS.items():
        train(validate_config(_raw(data, regs, 8)), root / f"one-{kind}")
    return root


@pytest.mark.parametrize("kind", KINDS)
def test_two_processes_end_with_the_weights_of_one(runs: Path, kind: str) -> None:
    one = load_file(str(runs / f"one-{kind}" / "model" / "model.safetensors"))
    two = load_file(str(runs / f"two-{kind}" / "model" / "model.safetensors"))
    for name in one:
        torch.testing.assert_close(two[name], one[name], **TOLERANCE, msg=name)
    worst = max((two[n] - one[n]).abs().max().item() for n in one)
    print(f"{kind}: largest weight difference 1 vs 2 processes {worst:.2e}")
    m1 = json.loads((runs / f"one-{kind}" / "metrics.json").read_text())
    m2 = json.loads((runs / f"two-{kind}" / "metrics.json").read_text())
    assert m1["global_step"] == m2["global_step"] == 12
    assert m2["target"]["val_loss"] == pytest.approx(m1["target"]["val_loss"], rel=1e-4)
    assert m2["forgetting"]["delta_loss"] == pytest.approx(m1["forgetting"]["delta_loss"], rel=1e-3, abs=1e-4)


def test_fisher_of_two_processes_is_the_fisher_of_one(runs: Path) -> None:
    """Each process estimates on its share of the reference batches; the all-reduced sum is the whole set's."""
    one = load_file(str(runs / "one-penalty" / "fisher.safetensors"))
    two = load_file(str(runs / "two-penalty" / "fisher.safetensors"))
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-12, msg=name)


def test_only_the_main_process_measures_and_writes(runs: Path) -> None:
    for kind in KINDS:
        main = json.loads((runs / f"two-{kind}.rank0.json").read_text())
        assert main == json.loads((runs / f"two-{kind}" / "metrics.json").read_text())
        assert json.loads((runs / f"two-{kind}.rank1.json").read_text()) == {}  # rank 1 measured and wrote nothing
    names = {p.name for p in (runs / "two-plain").iterdir()}
    assert {"metrics.json", "model", "history.jsonl", "checkpoint-12"} <= names
    assert not [n for n in names if n.startswith(".")]  # no temporary or set-aside files left by a race


def test_whole_parameter_regularizers_are_refused_when_sharded() -> None:
    from tether.config import RegularizerEntry
    from tether.errors import ConfigError
    from tether.regularizers import RegularizerStack, parse_entries
    from tether.run import check_sharded

    def stack(*names: str) -> RegularizerStack:
        return RegularizerStack.from_configs(parse_entries([RegularizerEntry(name=n) for n in names]))

    check_sharded(stack("kl", "distill", "replay", "llrd", "weight_decay", "dropout", "neftune", "label_smoothing"))
    with pytest.raises(ConfigError, match="l2_sp, ewc keep whole-parameter copies"):
        check_sharded(stack("kl", "l2_sp", "ewc"))
