"""The regularizers on FSDP2-sharded parameters: a tiny Llama trained a few steps with `fully_shard` in every process
of a `torchrun` launch (gloo on CPU), or unsharded in one process, by the same code. tests/test_multiprocess.py
compares the two. The Trainer only runs FSDP on GPUs; this loop is the Trainer's step as tether sees it.

    torchrun --standalone --nproc_per_node 2 tests/fsdp_runs.py OUT_DIR
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from tether.api import encode_rows
from tether.data import Collator, Split
from tether.distributed import full, is_main_process, world_size
from tether.errors import TetherError
from tether.evaluate import reference_metrics
from tether.regularizers import REGISTRY, RegularizerStack, SetupContext
from tether.step import train_step
from tether.synthetic import char_tokenizer, tiny_model
from tether.tracking import Probe, RunLog

KINDS: dict[str, dict[str, Any]] = {
    "penalties": {
        "regularizers": [
            {"name": "l2", "strength": 1e-3},
            {"name": "l1", "strength": 1e-4},
            {"name": "l2_sp", "strength": 5.0},
            {"name": "ewc", "strength": 0.5},
            {"name": "si", "strength": 0.3},
            {"name": "weight_decay", "strength": 0.1},
            {"name": "llrd", "decay": 0.8},
        ],
    },
    "penalty_forms": {
        "regularizers": [
            {"name": "l2_sp", "strength": 0.05, "form": "penalty"},
            {"name": "ewc", "strength": 10.0, "estimator": "empirical", "normalize": False},
        ],
    },
    "lora": {
        "lora": True,
        "regularizers": [{"name": "l2_sp", "strength": 5.0}, {"name": "kl", "strength": 0.5}],
    },
    # mofo's top-α is per shard under FSDP2, not per tensor: the one-process run takes it by hand on the dim-0
    # halves the two processes hold (mofo_on_halves), as the reference
    "filter": {"regularizers": [{"name": "mofo", "fraction": 0.2}], "halves_by_hand": True},
}
STEPS, LR, ROWS, SEQ, VOCAB = 6, 3e-3, 8, 16, 64


def batches(seed: int, count: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(4, VOCAB, (ROWS, SEQ), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def build(kind: dict[str, Any], shard: bool, vocab: int = VOCAB) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tiny_model("llama", "causal_lm", vocab, hidden_size=32, num_layers=2, num_heads=4)
    if kind.get("lora"):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    return sharded(model) if shard else model


def sharded(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 over every process: each decoder layer, then the rest."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size(),))
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def refused(root: Path) -> None:
    """What cannot run on sharded parameters (ema's whole-model average) is refused at setup, on every process."""
    stack = RegularizerStack.from_configs([REGISTRY["ema"].config(name="ema")])
    try:
        stack.setup(SetupContext(build({}, shard=True), None, LR))
        message = "accepted"
    except TetherError as e:
        message = str(e)
    if is_main_process():
        (root / "fsdp-refused.txt").write_text(message)


def mofo_on_halves(model: torch.nn.Module, optimizer: torch.optim.Optimizer, before: list, fraction: float) -> None:
    """Naive per-shard MoFO after an unsharded AdamW step: each parameter's dim-0 halves (FSDP2's Shard(0) on two
    processes) keep the update only on their ceil(fraction * n) entries of largest |exp_avg|."""
    with torch.no_grad():
        for p, p0 in zip(model.parameters(), before):
            halves = zip(p.chunk(2), p0.chunk(2), optimizer.state[p]["exp_avg"].chunk(2))
            for theta, theta0, m in halves:
                kept = m.abs().flatten().argsort(descending=True)[math.ceil(fraction * m.numel()) :]
                theta.view(-1)[kept] = theta0.reshape(-1)[kept]


def train(kind: dict[str, Any], out: Path, shard: bool) -> None:
    """STEPS AdamW steps on the global batches (each process takes its rows); writes the gathered weights, the
    logged penalties and the Fisher file under `out` (main process)."""
    model = build(kind, shard)
    by_hand = kind.get("halves_by_hand") and not shard
    configs = [REGISTRY[r["name"]].config(**r) for r in kind["regularizers"] if not by_hand]
    stack = RegularizerStack.from_configs(configs)
    reference = batches(1, 3)
    refs = lambda shard=True: iter(reference)  # noqa: E731 (every process gets them all unless asked to shard)
    out.mkdir(parents=True, exist_ok=True)
    stack.setup(SetupContext(model, refs, LR, output_dir=out))
    optimizer = torch.optim.AdamW(stack.optimizer_groups(model, LR), lr=LR, weight_decay=0.0)
    stack.attach(model, optimizer)
    rank, world = (torch.distributed.get_rank(), world_size()) if shard else (0, 1)
    logs = []
    for batch in batches(2, STEPS):
        mine = {k: v[rank::world] for k, v in batch.items()}  # equal rows and tokens: the mean of means is the mean
        before = [p.detach().clone() for p in model.parameters()] if by_hand else []
        train_step(model, mine, optimizer, stack)
        if by_hand:
            mofo_on_halves(model, optimizer, before, kind["regularizers"][0]["fraction"])
        logs.append(stack.pop_logs())
    weights = {n: full(p).detach().clone() for n, p in model.named_parameters()}
    (out / f"memory.rank{rank}.json").write_text(json.dumps(stack.memory()))
    if is_main_process():
        from safetensors.torch import save_file

        save_file(weights, str(out / "weights.safetensors"))
        (out / "logs.json").write_text(json.dumps(logs))


def tracked(out: Path, shard: bool) -> None:
    """Forgetting tracked as at an evaluation of `tether train` (tracking.RunLog: reference loss and its increase,
    greedy recall, the probe's KL), on the model after STEPS AdamW steps, sharded or not; the base's numbers and the
    probe's logits are taken before, as start_tracking takes them. Under FSDP every process measures."""
    tokenizer = char_tokenizer()
    model = build({}, shard=False, vocab=len(tokenizer))
    facts = [{"prompt": f"{a} plus {b} is", "completion": f" {a + b}"} for a, b in [(1, 2), (3, 4), (5, 6), (7, 1)]]
    measured = Split(facts, encode_rows(facts, tokenizer, 32), "prompt_completion")
    collator = Collator(tokenizer.pad_token_id)
    run_log = RunLog(None)
    before = reference_metrics(model, tokenizer, measured, collator)
    probe = Probe.build(model, measured.encoded, collator, None, 2**20)
    model = sharded(model) if shard else model
    run_log.start(model, tokenizer, collator, measured, before, probe)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rank, world = (torch.distributed.get_rank(), world_size()) if shard else (0, 1)
    for batch in batches(3, STEPS):
        model(**{k: v[rank::world] for k, v in batch.items()}).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    measures = run_log.measure(model)
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        (out / "tracked.json").write_text(json.dumps(measures))


if __name__ == "__main__":
    torch.set_num_threads(1)  # two processes on two cores
    torch.distributed.init_process_group("gloo")
    root = Path(sys.argv[1])
    for name, kind in KINDS.items():
        train(kind, root / f"fsdp-{name}", shard=True)
    refused(root)
    tracked(root / "fsdp-tracked", shard=True)
    torch.distributed.destroy_process_group()
