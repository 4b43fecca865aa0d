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

from tests import fsdp_runs
from tests.conftest import write_data_files
from tether.config import validate_config
from tether.regularizers.ewc import RUN_FISHER
from tether.run import train

pytestmark = pytest.mark.multiprocess
ROOT = Path(__file__).resolve().parents[1]
KINDS = {
    "plain": [],
    "penalty": [{"name": "l2_sp", "strength": 5.0}, {"name": "ewc", "strength": 0.5}],
    "reference": [{"name": "kl", "strength": 0.5}, {"name": "distill", "strength": 0.5}],
    "data": [{"name": "replay", "ratio": 0.25}],
    "optimizer": [{"name": "weight_decay", "strength": 0.1}, {"name": "llrd", "decay": 0.7}],
    "filter": [{"name": "mofo", "fraction": 0.2}],  # each process masks by the same all-reduced momentum
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
    assert not [n for n in names if n.startswith(".") and n != ".tether"]  # no temporary or set-aside files left


def test_what_cannot_run_sharded_is_refused_before_training() -> None:
    from tether.config import RegularizerEntry
    from tether.errors import ConfigError
    from tether.regularizers import RegularizerStack, parse_entries
    from tether.run import check_deepspeed, check_fsdp

    def stack(*names: str) -> RegularizerStack:
        return RegularizerStack.from_configs(parse_entries([RegularizerEntry(name=n) for n in names]))

    others = ("replay", "llrd", "weight_decay", "dropout", "neftune", "label_smoothing")
    check_deepspeed(stack("kl", "distill", *others))
    with pytest.raises(ConfigError, match="l2_sp, ewc work on the parameters and gradients"):
        check_deepspeed(stack("kl", "l2_sp", "ewc"))
    check_fsdp(stack("l1", "l2", "l2_sp", "ewc", "si", *others), fsdp_version=2, lora=False)
    check_fsdp(stack("kl", "distill", "l2_sp"), fsdp_version=2, lora=True)
    with pytest.raises(ConfigError, match="tether needs FSDP2"):
        check_fsdp(stack("l2_sp"), fsdp_version=1, lora=False)
    with pytest.raises(ConfigError, match="ema, wise_ft keep whole-model copies"):
        check_fsdp(stack("l2_sp", "ema", "wise_ft"), fsdp_version=2, lora=False)
    with pytest.raises(ConfigError, match="kl on FSDP need LoRA"):
        check_fsdp(stack("kl", "ewc"), fsdp_version=2, lora=False)


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory) -> Path:
    """tests/fsdp_runs.py: each kind sharded over two processes (one torchrun launch) and unsharded in this one."""
    if not _can_spawn():
        pytest.skip("torchrun is not installed next to this Python")
    root = tmp_path_factory.mktemp("fsdp")
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(ROOT / "tests" / "fsdp_runs.py"), str(root)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, kind in fsdp_runs.KINDS.items():
        fsdp_runs.train(kind, root / f"one-{name}", shard=False)
    fsdp_runs.tracked(root / "one-tracked", shard=False)
    return root


@pytest.mark.parametrize("kind", fsdp_runs.KINDS)
def test_fsdp_sharded_regularizers_match_one_process(fsdp: Path, kind: str) -> None:
    """Weights after 6 steps (measured: <= 3.5e-6), every closed-form penalty as logged (summed over the shards)
    and the Fisher file gathered from the shards equal the unsharded run's (for mofo: with its top-α taken by hand
    on each process's half of every tensor, fsdp_runs.mofo_on_halves)."""
    one, two = fsdp / f"one-{kind}", fsdp / f"fsdp-{kind}"
    w1, w2 = load_file(str(one / "weights.safetensors")), load_file(str(two / "weights.safetensors"))
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], **TOLERANCE, msg=name)
    logs1, logs2 = json.loads((one / "logs.json").read_text()), json.loads((two / "logs.json").read_text())
    closed_form = {"reg/l2", "reg/l1", "reg/l2_sp", "reg/ewc", "reg/si"}
    assert len(logs1) == len(logs2) == fsdp_runs.STEPS
    for step1, step2 in zip(logs1, logs2):
        assert step1.keys() == step2.keys()
        for key in closed_form & step1.keys():
            assert step2[key] == pytest.approx(step1[key], rel=1e-5, abs=1e-7), key
    if (one / RUN_FISHER).exists():
        f1, f2 = load_file(str(one / RUN_FISHER)), load_file(str(two / RUN_FISHER))
        for name in f1:
            torch.testing.assert_close(f2[name], f1[name], rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", ["penalties", "penalty_forms"])
def test_fsdp_state_is_sharded_with_the_parameters(fsdp: Path, kind: str) -> None:
    """Each process holds about half of the anchor and Fisher that one process holds: no whole copy per rank."""
    one = json.loads((fsdp / f"one-{kind}" / "memory.rank0.json").read_text())
    for rank in (0, 1):
        part = json.loads((fsdp / f"fsdp-{kind}" / f"memory.rank{rank}.json").read_text())
        assert part.keys() == one.keys()
        for what, nbytes in one.items():
            assert 0.35 * nbytes <= part[what] <= 0.65 * nbytes, what


def test_fsdp_mofo_keeps_only_its_shards(fsdp: Path) -> None:
    """mofo's copy of the weights before the step holds this process's shards: about half of the model."""
    whole = sum(
        t.numel() * t.element_size() for t in load_file(str(fsdp / "one-filter" / "weights.safetensors")).values()
    )
    for rank in (0, 1):
        held = json.loads((fsdp / "fsdp-filter" / f"memory.rank{rank}.json").read_text())
        assert 0.35 * whole <= held["mofo: weights before the step"] <= 0.65 * whole


def test_fsdp_tracks_forgetting_as_one_process_does(fsdp: Path) -> None:
    """At an evaluation under FSDP every process measures the sharded model (collective forwards, generation kept
    in step): the reference loss, its increase, recall and the probe's KL equal the unsharded run's."""
    one = json.loads((fsdp / "one-tracked" / "tracked.json").read_text())
    two = json.loads((fsdp / "fsdp-tracked" / "tracked.json").read_text())
    assert set(one) == set(two) == {"eval_reference_loss", "eval_forgetting", "eval_recall", "eval_probe_kl"}
    assert one["eval_forgetting"] > 0.01 and one["eval_probe_kl"] > 0.01  # the steps moved the model
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key


def test_fsdp_refuses_whole_model_state(fsdp: Path) -> None:
    assert "ema keep whole-model copies and do not run on FSDP" in (fsdp / "fsdp-refused.txt").read_text()


@pytest.mark.slow
def test_lm_eval_at_evaluations_under_ddp_shares_the_main_process_scores(tmp_path: Path) -> None:
    """lm-eval returns its results on the main process only (the other processes died at the first evaluation):
    the main process scores at each evaluation and shares the scores, and the run ends with one process's numbers."""
    pytest.importorskip("lm_eval")
    if not _can_spawn():
        pytest.skip("torchrun is not installed next to this Python")
    from tether.lmeval import TASK_NAME, write_task_pack

    data = write_data_files(tmp_path)
    facts = [json.loads(line) for line in data["reference"].read_text().splitlines()]
    pack = write_task_pack(tmp_path / "tasks", facts)
    lm_eval = {"lm_eval": {"tasks": [TASK_NAME], "include_path": str(pack), "at_evaluations": True}}
    (tmp_path / "jobs.json").write_text(
        json.dumps([[_raw(data, [], 4) | {"evaluation": lm_eval}, str(tmp_path / "two")]])
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(ROOT / "tests" / "ddp_runs.py")]
    proc = subprocess.run([*cmd, str(tmp_path / "jobs.json")], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(validate_config(_raw(data, [], 8) | {"evaluation": lm_eval}), tmp_path / "one")
    key = f"eval_lm_eval/{TASK_NAME}/acc"
    evals = {}
    for run in ("one", "two"):
        history = [json.loads(line) for line in (tmp_path / run / "history.jsonl").read_text().splitlines()]
        evals[run] = [e[key] for e in history if "eval_loss" in e]
    assert len(evals["one"]) == 2 and evals["two"] == pytest.approx(evals["one"], abs=1e-6)
