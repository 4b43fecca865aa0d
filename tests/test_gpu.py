"""On a CUDA device: `tether train` through the Trainer's FSDP2 path gives the run plain training gives.

FSDP only runs on GPUs in the Trainer (on CPU Accelerate turns it into DDP), so these tests need one; tests/
test_multiprocess.py covers the regularizers on sharded parameters on CPU. One GPU: torchrun with one process shards
over a world of one, which still makes every parameter a DTensor and goes through Accelerate's FSDP2 preparation,
the deferred setup, the sharded checkpoints and the gathered final model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import write_data_files

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
ROOT = Path(__file__).resolve().parents[1]
KINDS = {
    "penalties": ([{"name": "l2_sp", "strength": 5.0}, {"name": "ewc", "strength": 0.5},
                   {"name": "si", "strength": 0.3}, {"name": "l1", "strength": 1e-5}], None),
    "lora_kl": ([{"name": "l2_sp", "strength": 5.0}, {"name": "kl", "strength": 0.5}], {"r": 4}),
    # groups built before the sharding (transformers creates the optimizer first under FSDP2): norms exempt, lrs spread
    "optimizer": ([{"name": "weight_decay", "strength": 0.1}, {"name": "llrd", "decay": 0.5},
                   {"name": "l2_sp", "strength": 5.0}], None),
}  # fmt: skip
OPTIMIZER_LEVEL = {"weight_decay", "llrd"}  # no penalty, so no reg/<name> in the logs
FSDP = {"fsdp": "full_shard", "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}}


def _config(data: dict[str, Path], regularizers: list[dict], lora: dict | None, out: Path, fsdp: bool) -> Path:
    raw = {
        "model": {"synthetic": {"arch": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4}},
        "data": {k: str(v) for k, v in data.items()} | {"format": "prompt_completion", "max_length": 32},
        "training": {
            "learning_rate": 3e-3, "max_steps": 12, "per_device_train_batch_size": 8, "eval_steps": 6,
            "per_device_eval_batch_size": 4, "save_steps": 6, "logging_steps": 3, **(FSDP if fsdp else {}),
        },
        "regularizers": regularizers,
        "output_dir": str(out),
    }  # fmt: skip
    if lora is not None:
        raw["lora"] = lora
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(raw))
    return path


def _train(config: Path) -> subprocess.CompletedProcess:
    """`tether train` under torchrun with one process (FSDP needs a process group), as a user would launch it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    cmd += ["-m", "tether", "train", str(config)]
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("kind", KINDS)
def test_fsdp_trainer_run_matches_plain(tmp_path: Path, kind: str) -> None:
    data = write_data_files(tmp_path)
    regularizers, lora = KINDS[kind]
    runs = {}
    for fsdp in (False, True):
        out = tmp_path / ("fsdp" if fsdp else "plain")
        proc = _train(_config(data, regularizers, lora, out, fsdp))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        runs[fsdp] = out
    weights = "adapter_model.safetensors" if lora else "model.safetensors"  # PEFT saves the adapters alone
    plain, sharded = (load_file(str(runs[f] / "model" / weights)) for f in (False, True))
    assert plain.keys() == sharded.keys()
    for name in plain:
        torch.testing.assert_close(sharded[name], plain[name], atol=1e-4, rtol=1e-3, msg=name)
    m_plain, m_sharded = (json.loads((runs[f] / "metrics.json").read_text()) for f in (False, True))
    assert m_sharded["target"]["val_loss"] == pytest.approx(m_plain["target"]["val_loss"], rel=1e-3)
    logged = [r for r in _history(runs[True]) if "loss" in r]
    assert logged and all(f"reg/{r['name']}" in logged[-1] for r in regularizers if r["name"] not in OPTIMIZER_LEVEL)
    if kind == "penalties":
        f_plain, f_sharded = (load_file(str(runs[f] / "fisher.safetensors")) for f in (False, True))
        for name in f_plain:
            torch.testing.assert_close(f_sharded[name], f_plain[name], rtol=1e-3, atol=1e-9)


def test_fsdp_refuses_whole_model_state_in_one_line(tmp_path: Path) -> None:
    data = write_data_files(tmp_path)
    proc = _train(_config(data, [{"name": "ema"}], None, tmp_path / "ema", fsdp=True))
    assert proc.returncode != 0  # tether exits 2; torchrun reports a failed child as 1
    assert "ema keep whole-model copies and do not run on FSDP" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "ema").exists()


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
