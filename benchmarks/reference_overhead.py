"""Overhead of the regularizers around the frozen reference (distill, kl) and of neftune, dropout, label_smoothing,
ema on a training step; peak memory with each reference; memory of chunked vs whole-tensor KL on a 32k vocabulary.

    .venv/bin/python benchmarks/reference_overhead.py [--reps 20] [--seq 64] [--threads 1] [--run-reps 2]

Step time: a tiny Llama (hidden 128, 4 layers, vocab 1000) trains on CPU on batches of 8 x seq tokens through the
trainer's path (forward, stack.penalty, backward, AdamW step with the stack's hooks). Every configuration has its own
model copy; each repetition times every configuration's step next to a plain step of the same kind (LoRA or full),
in random order, and the table gives the median ratio over repetitions (load from other processes cancels out).
Each repetition brings new rows, so the reference runs on every batch (a first epoch); the "rows seen before"
configurations have had their rows through the reference once before the timed step, as in later epochs, where the
row cache answers without a forward.
Whole runs: `tether train` on the demo's world (its pre-trained base, 500 arithmetic rows, 200 steps of 16 rows:
6.4 epochs), LoRA and full fine-tuning, plain and with kl (row cache on and off), no evaluation or checkpoints during
training; the Trainer's train_runtime, median over --run-reps interleaved repetitions.
Memory: each configuration runs in a fresh subprocess with a fixed glibc mmap threshold (so freed tensors go back
to the OS and RSS follows live memory); after the imports the peak RSS is reset (/proc/self/clear_refs), and the
footprint is the new peak minus the RSS then: weights, optimizer state, activations and the reference.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from overhead import Run

from tether.data import IGNORE
from tether.reference import Reference, ReferenceOptions
from tether.synthetic import tiny_model

LR, BATCH = 1e-4, 8
STEP_CONFIGS: dict[str, tuple[bool, list[dict[str, Any]]]] = {  # name: (LoRA?, regularizers)
    "distill (LoRA, adapters disabled)": (True, [{"name": "distill"}]),
    "kl (LoRA, adapters disabled)": (True, [{"name": "kl"}]),
    "distill + kl (LoRA, one reference forward)": (True, [{"name": "distill"}, {"name": "kl"}]),
    "distill (full, frozen copy)": (False, [{"name": "distill"}]),
    "kl (full, frozen copy)": (False, [{"name": "kl"}]),
    "distill + kl (full, one reference forward)": (False, [{"name": "distill"}, {"name": "kl"}]),
    "kl (full, bf16 copy)": (False, [{"name": "kl", "reference": {"dtype": "bfloat16"}}]),
    "neftune": (False, [{"name": "neftune", "alpha": 5.0}]),
    "dropout (attention 0.1)": (False, [{"name": "dropout", "attention": 0.1}]),
    "label_smoothing": (False, [{"name": "label_smoothing", "strength": 0.1}]),
    "ema": (False, [{"name": "ema"}]),
    "kl (LoRA), rows seen before": (True, [{"name": "kl"}]),
    "distill + kl (LoRA), rows seen before": (True, [{"name": "distill"}, {"name": "kl"}]),
    "kl (full), rows seen before": (False, [{"name": "kl"}]),
}
SEEN = " rows seen before"
MEMORY_CONFIGS = {
    "LoRA plain": (True, []),
    "LoRA + distill + kl": (True, [{"name": "distill"}, {"name": "kl"}]),
    "full plain": (False, []),
    "full + distill + kl (fp32 copy)": (False, [{"name": "distill"}, {"name": "kl"}]),
    "full + distill + kl (bf16 copy)": (
        False,
        [{"name": "distill"}, {"name": "kl", "reference": {"dtype": "bfloat16"}}],
    ),
}


def small_model(vocab: int = 1000, hidden: int = 128, layers: int = 4) -> torch.nn.Module:
    return tiny_model("llama", "causal_lm", vocab, hidden_size=hidden, num_layers=layers, num_heads=4, seed=0)


def with_lora(model: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type=TaskType.CAUSAL_LM))


def batch_of(gen: torch.Generator, seq: int, vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(4, vocab, (BATCH, seq), generator=gen)
    labels = ids.clone()
    labels[:, : seq // 4] = IGNORE  # a prompt without loss
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def run_of(base: torch.nn.Module, lora: bool, entries: list[dict[str, Any]]) -> Run:
    return Run(base, entries, prepare=with_lora if lora else lambda m: m)


def step_ratios(reps: int, seq: int) -> dict[str, float]:
    base = small_model()
    plain = {False: run_of(base, False, []), True: run_of(base, True, [])}
    runs = {name: (run_of(base, lora, entries), lora) for name, (lora, entries) in STEP_CONFIGS.items()}
    gen = torch.Generator().manual_seed(0)
    ratios: dict[str, list[float]] = {name: [] for name in runs}
    rng = random.Random(0)
    for rep in range(reps + 2):  # the first two repetitions warm up
        batch = batch_of(gen, seq, 1000)
        for name in rng.sample(list(runs), len(runs)):
            run, lora = runs[name]
            if name.endswith(SEEN):  # the rows went through the reference once already: a later epoch
                run.stack.prefetch(batch)
                run.stack.reference.clear()
            if rng.random() < 0.5:  # which of the pair goes first, at random
                regularized, baseline = run.step(batch), plain[lora].step(batch)
            else:
                baseline, regularized = plain[lora].step(batch), run.step(batch)
            if rep >= 2:
                ratios[name].append(regularized / baseline)
    plain_ms = {
        k: 1000 * statistics.median(v.step(batch_of(gen, seq, 1000)) for _ in range(5)) for k, v in plain.items()
    }
    print(f"plain step: full {plain_ms[False]:.0f} ms, LoRA {plain_ms[True]:.0f} ms")
    return {name: statistics.median(r) for name, r in ratios.items()}


WHOLE_RUNS = {  # name: (LoRA?, regularizers)
    "LoRA plain": (True, []),
    "LoRA + kl": (True, [{"name": "kl"}]),
    "LoRA + kl, no row cache": (True, [{"name": "kl", "reference": {"cache_mb": 0}}]),
    "full plain": (False, []),
    "full + kl": (False, [{"name": "kl"}]),
    "full + kl, no row cache": (False, [{"name": "kl", "reference": {"cache_mb": 0}}]),
}


def whole_runs(reps: int) -> dict[str, float]:
    """{name: median train_runtime in seconds} of `tether train` runs on the demo's world (module docstring)."""
    import tempfile
    from pathlib import Path

    from tether.config import validate_config
    from tether.harness.demo import demo_config
    from tether.run import train
    from tether.synthetic import pretrained_base

    base = pretrained_base()
    seconds: dict[str, list[float]] = {name: [] for name in WHOLE_RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(reps):
            for name, (lora, regularizers) in WHOLE_RUNS.items():
                cfg = demo_config(base, regularizers)
                cfg["training"].update(eval_strategy="no", save_strategy="no")
                if lora:
                    cfg["lora"] = {"r": 16, "alpha": 32}
                out = train(validate_config(cfg), Path(tmp) / f"{rep}", overwrite=True)
                seconds[name].append(out["train_runtime_s"])
    return {name: statistics.median(s) for name, s in seconds.items()}


def status_mb(key: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024


def start_measuring() -> float:
    """Reset the peak RSS to the current RSS and return it (imports done: they are not the regularizers' cost)."""
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_mb("VmRSS")


def child_memory(lora: bool, entries: list[dict[str, Any]], seq: int, steps: int) -> dict[str, Any]:
    """In a fresh process: footprint of `steps` training steps of one configuration."""
    start = start_measuring()
    run = run_of(small_model(), lora, entries)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        run.step(batch_of(gen, seq, 1000))
    ref = run.stack.reference
    copied = 0
    if ref is not None and ref.frozen is not None:
        copied = sum(p.numel() * p.element_size() for p in ref.frozen.parameters())
    elif ref is not None and ref.adapter is not None:
        copied = sum(t.numel() * t.element_size() for t in ref.adapter.values())
    return {"footprint_mb": status_mb("VmHWM") - start, "reference_copy_mb": copied / 2**20,
            "reference_mode": None if ref is None else ref.mode}  # fmt: skip


def naive_kl(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Reverse KL as a plain implementation writes it: fp32 log-softmax of the whole [batch, tokens, vocab]."""
    s = F.log_softmax(student[:, :-1].float(), -1)
    t = F.log_softmax(teacher[:, :-1].float(), -1)
    per_token = (s.exp() * (s - t)).sum(-1)
    mask = labels[:, 1:] != IGNORE
    return (per_token * mask).sum() / mask.sum()


def child_kl_memory(mode: str, seq: int, vocab: int, chunk: int) -> dict[str, Any]:
    """In a fresh process: footprint of two steps of a 32k-vocab tiny model with no KL, whole-tensor KL, chunked KL."""
    from tether.regularizers.distill import divergence

    start = start_measuring()
    model = small_model(vocab=vocab, hidden=64, layers=2)
    reference = Reference.build(model, ReferenceOptions(cache_mb=0)) if mode == "reference" else None
    frozen = copy.deepcopy(model).requires_grad_(False).eval() if mode in ("whole", "chunked") else None
    gen = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for _ in range(2):
        batch = batch_of(gen, seq, vocab)
        if mode == "reference":  # tether's path: the reference first, its logits made per chunk from hidden states
            teacher = reference.logits(batch)
        out = model(**batch)
        loss = out.loss
        if mode == "reference":
            loss = loss + divergence(out.logits, teacher, batch["labels"], "reverse", 1.0, 0.5, chunk)
            reference.clear()
            del teacher
        elif mode != "none":
            with torch.no_grad():
                teacher = frozen(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            if mode == "whole":
                loss = loss + naive_kl(out.logits, teacher, batch["labels"])
            else:
                loss = loss + divergence(out.logits, teacher, batch["labels"], "reverse", 1.0, 0.5, chunk)
        loss.backward()
        model.zero_grad(set_to_none=True)
        del out, loss
    seconds = (time.perf_counter() - started) / 2
    return {"footprint_mb": status_mb("VmHWM") - start, "step_s": seconds}


def child_loss_memory(mode: str, chunk: int) -> dict[str, Any]:
    """In a fresh process: peak memory of the KL's forward and backward alone, on given [4, 128, 32k] logits."""
    from tether.regularizers.distill import divergence

    gen = torch.Generator().manual_seed(0)
    student = torch.randn(4, 128, 32_000, generator=gen).requires_grad_(True)
    teacher = torch.randn(4, 128, 32_000, generator=gen)
    labels = torch.randint(4, 32_000, (4, 128), generator=gen)
    labels[:, :32] = IGNORE
    start = start_measuring()
    started = time.perf_counter()
    if mode == "whole":
        naive_kl(student, teacher, labels).backward()
    else:
        divergence(student, teacher, labels, "reverse", 1.0, 0.5, chunk).backward()
    return {"extra_mb": status_mb("VmHWM") - start, "seconds": time.perf_counter() - started}


def in_child(*args: str) -> dict[str, Any]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # fixed: large blocks are mmapped and given back
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--run-reps", type=int, default=2, help="repetitions of the whole runs (0: skip them)")
    parser.add_argument("--child", choices=["memory", "kl", "loss"])
    parser.add_argument("--arg", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child == "memory":
        lora, entries = MEMORY_CONFIGS[args.arg]
        print(json.dumps(child_memory(lora, entries, args.seq, steps=3)))
        return
    if args.child == "loss":
        mode, _, chunk = args.arg.partition(" ")
        print(json.dumps(child_loss_memory(mode, int(chunk or 0))))
        return
    if args.child == "kl":
        print(json.dumps(child_kl_memory(args.arg, seq=128, vocab=32_000, chunk=128)))
        return
    common = ["--seq", str(args.seq), "--threads", str(args.threads)]
    print(f"## step time, 8 x {args.seq} tokens, median of {args.reps} interleaved pairs\n")
    print("| configuration | step time / plain step |\n| --- | --- |")
    for name, ratio in step_ratios(args.reps, args.seq).items():
        print(f"| {name} | {ratio:.3f}x |")
    if args.run_reps:
        print(f"\n## whole runs on the demo's world (train_runtime, median of {args.run_reps})\n")
        print("| run | seconds | / plain of its kind |\n| --- | --- | --- |")
        runs = whole_runs(args.run_reps)
        for name, seconds in runs.items():
            plain = runs["LoRA plain" if name.startswith("LoRA") else "full plain"]
            print(f"| {name} | {seconds:.1f} | {seconds / plain:.2f}x |")
    print("\n## peak memory (fresh process per configuration, 3 steps)\n")
    print("| configuration | footprint MB | / plain | reference mode | weights copied by the reference MB |")
    print("| --- | --- | --- | --- | --- |")
    memory = {name: in_child("--child", "memory", "--arg", name, *common) for name in MEMORY_CONFIGS}
    for name, m in memory.items():
        plain = memory["LoRA plain" if name.startswith("LoRA") else "full plain"]["footprint_mb"]
        print(f"| {name} | {m['footprint_mb']:.0f} | {m['footprint_mb'] / plain:.2f}x | {m['reference_mode']} | "
              f"{m['reference_copy_mb']:.2f} |")  # fmt: skip
    print("\n## reverse KL on a 32k-vocabulary tiny model (4 x 128 tokens, hidden 64; one [4, 128, 32k] fp32 "
          "tensor is 62.5 MB)\n")  # fmt: skip
    print("| KL | footprint MB | extra over no KL MB | step s |\n| --- | --- | --- | --- |")
    modes = ("none", "whole", "chunked", "reference")
    kl = {mode: in_child("--child", "kl", "--arg", mode, *common) for mode in modes}
    for mode, m in kl.items():
        extra = m["footprint_mb"] - kl["none"]["footprint_mb"]
        print(f"| {mode} | {m['footprint_mb']:.0f} | {extra:.0f} | {m['step_s']:.2f} |")
    print("\n## the KL's forward + backward alone on [4, 128, 32k] fp32 logits (96 positions masked)\n")
    print("| KL | peak extra MB (the student's gradient itself: 62.5) | seconds |\n| --- | --- | --- |")
    for mode in ("whole", "chunked 128", "chunked 32"):
        m = in_child("--child", "loss", "--arg", mode, *common)
        print(f"| {mode} | {m['extra_mb']:.0f} | {m['seconds']:.2f} |")


if __name__ == "__main__":
    main()
