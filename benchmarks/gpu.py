"""Step time and peak memory of each regularizer on a GPU, on a random-init Llama of about 0.5B parameters.

    python benchmarks/gpu.py [--layers 28] [--hidden 1024] [--seq 512] [--reps 15] [--out FILE.md] [--only NAME...]

No weights can be downloaded on the GPU machines, so the model is a Llama built from its config (hidden 1024,
28 layers, MLP 4096, vocab 32000: 0.54B parameters) with random weights: step times depend on the shapes, not on
the values. Training as the Trainer runs it on a GPU: fp32 weights, bf16 autocast, fused AdamW, batches of
8 x seq tokens (a quarter of each row a prompt without loss). Each configuration is timed in pairs against a plain
step of the same kind (full, LoRA r 16 on all linear layers, LoRA with gradient checkpointing, FSDP2), in random
order, with the device synchronized around every step; the table gives the median ratio and the peak memory the
configuration's own run holds at its step's peak (torch.cuda.max_memory_allocated minus what was allocated before
the run was built: weights, gradients, Adam moments, regularizer state, activations), beside its plain run's.
The FSDP2 rows shard over a world of one (a one-process NCCL group): the regularizers then work on DTensor
shards, as with N GPUs.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import Run

from tether.data import IGNORE
from tether.regularizers.ewc import estimate_fisher

BATCH = 8
Prepare = Callable[[torch.nn.Module], torch.nn.Module]


def llama(layers: int, hidden: int, vocab: int, seq: int, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=seq, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config)


def lora(model: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    return get_peft_model(model, config)


def checkpointed(prepare: Prepare) -> Prepare:
    def apply(model: torch.nn.Module) -> torch.nn.Module:
        model = prepare(model)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    return apply


def sharded(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            fully_shard(module)
    fully_shard(model)
    return model


KINDS: dict[str, Prepare] = {
    "full": lambda m: m,
    "LoRA": lora,
    "LoRA + grad. checkpointing": checkpointed(lora),
    "FSDP2 (1 GPU)": sharded,
}
# Every step here trains on the same batch: without cache_mb 0 the row cache would answer from the second step on,
# as in a later epoch. NEW_ROWS measures a first epoch (the reference runs); the row-cache line measures the others.
NEW_ROWS = {"cache_mb": 0}
CONFIGS: list[tuple[str, str, list[dict[str, Any]]]] = [  # (kind, name, regularizers)
    ("full", "l2", [{"name": "l2", "strength": 1e-4}]),
    ("full", "l1", [{"name": "l1", "strength": 1e-5}]),
    ("full", "l2_sp (decoupled)", [{"name": "l2_sp", "strength": 1.0}]),
    ("full", "l2_sp (penalty)", [{"name": "l2_sp", "strength": 0.01, "form": "penalty"}]),
    ("full", "ewc", [{"name": "ewc", "strength": 0.3}]),
    ("full", "si", [{"name": "si", "strength": 0.3}]),
    ("full", "llrd", [{"name": "llrd", "decay": 0.9}]),
    ("full", "weight_decay", [{"name": "weight_decay", "strength": 0.01}]),
    ("full", "ema", [{"name": "ema"}]),
    ("full", "neftune", [{"name": "neftune", "alpha": 5.0}]),
    ("full", "mofo", [{"name": "mofo", "fraction": 0.1}]),
    ("full", "dft", [{"name": "dft"}]),
    ("full", "eaft", [{"name": "eaft"}]),
    ("full", "flow", [{"name": "flow"}]),
    ("full", "asft (frozen fp32 copy)", [{"name": "asft", "reference": NEW_ROWS}]),
    ("full", "kl (frozen fp32 copy)", [{"name": "kl", "reference": NEW_ROWS}]),
    ("full", "kl (frozen bf16 copy)", [{"name": "kl", "reference": {**NEW_ROWS, "dtype": "bfloat16"}}]),
    ("LoRA", "l2_sp (LoRA: on B A)", [{"name": "l2_sp", "strength": 1.0}]),
    ("LoRA", "kl (adapters disabled)", [{"name": "kl", "reference": NEW_ROWS}]),
    ("LoRA", "distill + kl (one reference forward)", [{"name": "distill"}, {"name": "kl", "reference": NEW_ROWS}]),
    ("LoRA", "kl, rows seen before (row cache)", [{"name": "kl"}]),
    ("LoRA + grad. checkpointing", "kl (adapters disabled)", [{"name": "kl", "reference": NEW_ROWS}]),
    ("FSDP2 (1 GPU)", "l2_sp (decoupled)", [{"name": "l2_sp", "strength": 1.0}]),
    ("FSDP2 (1 GPU)", "l2_sp (penalty)", [{"name": "l2_sp", "strength": 0.01, "form": "penalty"}]),
    ("FSDP2 (1 GPU)", "ewc", [{"name": "ewc", "strength": 0.3}]),
    ("FSDP2 (1 GPU)", "si", [{"name": "si", "strength": 0.3}]),
    ("FSDP2 (1 GPU)", "mofo", [{"name": "mofo", "fraction": 0.1}]),
]


def batch_of(gen: torch.Generator, seq: int, vocab: int, device: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(4, vocab, (BATCH, seq), generator=gen)
    labels = ids.clone()
    labels[:, : seq // 4] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def timed_step(run: Run, batch: dict[str, torch.Tensor], device: str) -> tuple[float, int]:
    """(seconds, peak bytes allocated during the step) of one training step under bf16 autocast."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        seconds = run.step(batch)
    if device == "cuda":
        torch.cuda.synchronize()
        return seconds, torch.cuda.max_memory_allocated()
    return seconds, 0


def measure(
    base: torch.nn.Module, args: argparse.Namespace, refs: Callable, device: str
) -> list[tuple[str, str, float, float, float, float]]:
    """(kind, name, median ratio, plain ms, peak GiB, plain peak GiB) for every configuration."""
    gen, order, rows = torch.Generator().manual_seed(1), random.Random(0), []
    batch = batch_of(gen, args.seq, args.vocab, device)
    for kind, prepare in KINDS.items():
        if kind.startswith("FSDP") and not distributed(device):
            continue
        try:
            rows += measure_kind(base, kind, prepare, args, refs, device, batch, order)
        except Exception as e:  # keep the other kinds' rows; say what failed
            print(f"{kind}: failed: {type(e).__name__}: {e}", flush=True)
    return rows


def measure_kind(base: torch.nn.Module, kind: str, prepare: Prepare, args: argparse.Namespace, refs: Callable,
                 device: str, batch: dict[str, torch.Tensor], order: random.Random) -> list[tuple]:  # fmt: skip
    configs = [(name, entries) for k, name, entries in CONFIGS if k == kind and name in (args.only or [name])]
    if not configs:
        return []
    rows: list[tuple] = []
    train_rows = [  # the batch's rows, for flow's weights at setup
        {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
        for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist())
    ]
    start = allocated(device)
    plain = Run(base, [], refs, prepare=prepare, fused=device == "cuda")
    for _ in range(3):
        timed_step(plain, batch, device)
    plain_peak = max(timed_step(plain, batch, device)[1] for _ in range(2)) - start
    for name, entries in configs:
        start = allocated(device)  # the base model and the plain run: not this configuration's memory
        run = Run(base, entries, refs, prepare=prepare, fused=device == "cuda", train_rows=train_rows)
        for _ in range(3):
            timed_step(run, batch, device)
        pairs, peaks = [], []
        for _ in range(args.reps):
            first, second = (run, plain) if order.random() < 0.5 else (plain, run)
            t1, m1 = timed_step(first, batch, device)
            t2, m2 = timed_step(second, batch, device)
            (t_reg, m_reg), t_plain = ((t1, m1), t2) if first is run else ((t2, m2), t1)
            pairs.append((t_plain, t_reg))
            peaks.append(m_reg - start)
        ratio = statistics.median(r / p for p, r in pairs)
        plain_ms = 1e3 * statistics.median(p for p, _ in pairs)
        rows.append((kind, name, ratio, plain_ms, max(peaks) / 2**30, plain_peak / 2**30))
        print(f"{kind:28s} {name:40s} {ratio:.3f}x  plain {plain_ms:.1f} ms", flush=True)
        del run, first, second  # the loop's names hold the run too
        gc.collect()  # the stack's optimizer hooks make a reference cycle: free the run's tensors now
        if device == "cuda":
            torch.cuda.empty_cache()
    del plain
    return rows


def allocated(device: str) -> int:
    gc.collect()
    return torch.cuda.memory_allocated() if device == "cuda" else 0


def distributed(device: str) -> bool:
    """A one-process group for the FSDP2 rows (NCCL on a GPU)."""
    if device != "cuda":
        return False
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    return True


def fisher_cost(base: torch.nn.Module, refs: Callable, device: str) -> tuple[float, float]:
    """(seconds of the sampled Fisher pass, seconds of one forward + backward over the same batches)."""
    from tether.regularizers.anchor import trainable

    named = trainable(base)

    def forward_backward() -> None:
        for batch in refs():
            base(**batch).loss.backward()
        base.zero_grad(set_to_none=True)

    def timed(job: Callable[[], Any]) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            job()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(forward_backward)  # warm-up
    fb = statistics.median(timed(forward_backward) for _ in range(3))
    fisher = statistics.median(timed(lambda: estimate_fisher(base, named, refs(), "sampled")) for _ in range(3))
    return fisher, fb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--reps", type=int, default=15, help="timed pairs per configuration")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    names = sorted({name for _, name, _ in CONFIGS})
    parser.add_argument("--only", nargs="+", choices=names, help="time only these configurations, no Fisher pass")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = llama(args.layers, args.hidden, args.vocab, args.seq, device)
    gen = torch.Generator().manual_seed(2)
    reference = [batch_of(gen, args.seq, args.vocab, device) for _ in range(4)]
    refs = lambda shard=True: iter(reference)  # noqa: E731
    n_params = sum(p.numel() for p in base.parameters())
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    head = (
        f"{name}, torch {torch.__version__}: random-init Llama, {n_params / 1e9:.2f}B parameters "
        f"({args.layers} layers, hidden {args.hidden}, vocab {args.vocab}), batch {BATCH} x {args.seq} tokens, "
        f"{'bf16 autocast, fused AdamW' if device == 'cuda' else 'fp32, AdamW'}, {args.reps} pairs"
    )
    print(head, flush=True)
    fisher, fb = fisher_cost(base, refs, device) if not args.only else (0.0, 0.0)
    rows = measure(base, args, refs, device)
    lines = [head, "", "| kind | configuration | step / plain step | plain step ms | footprint GiB | plain GiB |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    lines += [f"| {k} | {n} | {r:.3f}x | {ms:.1f} | {pk:.2f} | {pp:.2f} |" for k, n, r, ms, pk, pp in rows]
    if fb:
        lines += ["", f"ewc sampled Fisher pass over {len(reference)} batches: {fisher:.3f} s = {fisher / fb:.2f}x "
                  f"one forward + backward over them ({fb:.3f} s)"]  # fmt: skip
    text = "\n".join(lines)
    print("\n" + text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
