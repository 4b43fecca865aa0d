"""Overhead of each parameter-space, optimizer and loss-shaping regularizer on a step; setup cost of ewc and si.

    .venv/bin/python benchmarks/overhead.py [--reps 60] [--seq 96] [--threads 1] [--only mofo ...]

A tiny Llama (hidden 128, 4 layers, vocab 1000: 1.3M parameters) trains on CPU on batches of 8 x seq tokens through
the trainer's path: task loss + stack.penalty, backward, AdamW step (whose hooks run penalty_grad, step_begin,
step_end). Every configuration has its own copy of the model and optimizer. Each repetition times every regularizer's
step right next to a plain step (no regularizer), in random order, and the table gives the median over repetitions
of the ratio regularized / plain: load from other processes changes both sides of a pair alike and cancels out.
A regularizer's cost grows with the parameters and a step's with the tokens, so the ratio falls as seq grows; the
default, 8 x 96, is where the textbook autograd loop costs the 1.08-1.14x that issue #3 calibrates its target with.
Three calibration rows that are not tether: the textbook penalty as an autograd loop over the parameters; one fused
pass over the gradient, the anchor and a Fisher-sized tensor (the memory traffic below which no ewc or si kernel can
go on this machine); and a second plain model, whose ratio to the plain one is the noise of every ratio here.
kl and asft (kl's anchor beside dft's weights) run against a frozen copy; every step trains on the same batch,
so from the second step on the reference's row cache answers and their rows time the KL itself, not the reference
forward (benchmarks/reference_overhead.py times that).
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from tether.regularizers import REGISTRY, RegularizerStack, SetupContext
from tether.regularizers.anchor import trainable
from tether.regularizers.ewc import estimate_fisher
from tether.step import train_step
from tether.synthetic import tiny_model

CONFIGS: dict[str, dict[str, Any]] = {
    "l2": {"name": "l2", "strength": 1e-4},
    "l1": {"name": "l1", "strength": 1e-5},
    "l2_sp (decoupled)": {"name": "l2_sp", "strength": 1.0, "form": "decoupled"},
    "l2_sp (penalty)": {"name": "l2_sp", "strength": 0.01, "form": "penalty"},
    "ewc": {"name": "ewc", "strength": 0.3},
    "si": {"name": "si", "strength": 0.3},
    "llrd": {"name": "llrd", "decay": 0.9},
    "weight_decay": {"name": "weight_decay", "strength": 0.01},
    "mofo": {"name": "mofo", "fraction": 0.1},
    "dft": {"name": "dft"},
    "eaft": {"name": "eaft"},
    "flow": {"name": "flow"},
    "kl": {"name": "kl"},
    "asft": {"name": "asft"},
}
NAIVE = "l2_sp as an autograd loop (reference, not tether)"
FLOOR = "one pass over g, theta_0, F (the least any ewc kernel moves)"
CONTROL = "plain again (a second plain model: the noise of these ratios)"
LR = 1e-4
BATCH, VOCAB, REFERENCE_ROWS = 8, 1000, 64


def batch_of(gen: torch.Generator, seq: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(4, VOCAB, (BATCH, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class Run:
    """One configuration: its own model (a copy of base, optionally changed by `prepare`: LoRA), stack and AdamW,
    and a timed training step. benchmarks/reference_overhead.py uses it too."""

    def __init__(
        self,
        base: torch.nn.Module,
        entries: list[dict[str, Any]],
        refs: Callable | None = None,
        prepare: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
        fused: bool = False,
        naive: float = 0.0,
        floor: bool = False,
        train_rows: list[dict] | None = None,
    ) -> None:
        self.model = prepare(copy.deepcopy(base)).train()
        # naive > 0: the textbook penalty, strength/2 * sum over parameters of ((p - p0)^2).sum() through autograd,
        # what the 1.08-1.14x refers to; it calibrates what the tokens per step do to every ratio.
        self.naive = naive
        self.anchors = [(p, p.detach().clone()) for p in self.model.parameters() if p.requires_grad and naive]
        # floor: g <- lerp(g, theta_0, F) with F = 0 after the backward: it reads g, theta_0 and F and writes g once,
        # changing nothing. ewc must also read theta, so no ewc kernel, fused or not, can cost less than this row.
        trained = [p for p in self.model.parameters() if p.requires_grad and floor]
        self.floor = (trained, [p.detach().clone() for p in trained], [torch.zeros_like(p) for p in trained])
        self.stack = RegularizerStack.from_configs([REGISTRY[e["name"]].config(**e) for e in entries])
        self.stack.train_data(train_rows or [], None, 0)  # flow weighs the rows it will see
        self.stack.setup(SetupContext(self.model, refs, LR))
        groups = self.stack.optimizer_groups(self.model, LR)
        self.opt = torch.optim.AdamW(groups, lr=LR, weight_decay=0.0, fused=fused or None)
        self.stack.attach(self.model, self.opt)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        start = time.perf_counter()
        if not self.naive and not self.floor[0]:  # tether's rows: the trainer's step itself
            train_step(self.model, batch, self.opt, self.stack)
            return time.perf_counter() - start
        # the calibration rows (not tether): the same step by hand, with their extra work where it would run
        out = self.model(**batch)
        penalty = self.stack.penalty(self.model, batch, out)
        if self.naive:
            penalty = self.naive / 2 * sum(((p - p0) ** 2).sum() for p, p0 in self.anchors)
        (out.loss if penalty is None else out.loss + penalty).backward()
        if self.floor[0]:
            torch._foreach_lerp_([p.grad for p in self.floor[0]], self.floor[1], self.floor[2])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def step_overheads(
    base: torch.nn.Module, refs: Callable, reps: int, seq: int, only: list[str] | None = None
) -> list[tuple[str, float, float, float]]:
    """(name, median ratio to the adjacent plain step, median plain ms, median regularized ms) per configuration
    (`only`: just those of CONFIGS, and the control)."""
    gen, order = torch.Generator().manual_seed(0), random.Random(0)
    batch = batch_of(gen, seq)
    rows = [{"input_ids": r, "attention_mask": [1] * len(r), "labels": r} for r in batch["input_ids"].tolist()]
    plain = Run(base, [], refs)
    runs = {
        name: Run(base, [entry], refs, train_rows=rows) for name, entry in CONFIGS.items() if name in (only or CONFIGS)
    }
    if not only:
        runs[NAIVE] = Run(base, [], refs, naive=CONFIGS["l2_sp (penalty)"]["strength"])
        runs[FLOOR] = Run(base, [], refs, floor=True)
    runs[CONTROL] = Run(base, [], refs)
    for run in [plain, *runs.values()]:  # warm-up: allocator, optimizer state
        for _ in range(3):
            run.step(batch)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(reps):
        for name in order.sample(list(runs), len(runs)):
            if order.random() < 0.5:
                t_plain, t_reg = plain.step(batch), runs[name].step(batch)
            else:
                t_reg, t_plain = runs[name].step(batch), plain.step(batch)
            times[name].append((t_plain, t_reg))
    rows = []
    for name, pairs in times.items():
        ratio = statistics.median(r / p for p, r in pairs)
        rows.append(
            (name, ratio, 1e3 * statistics.median(p for p, _ in pairs), 1e3 * statistics.median(r for _, r in pairs))
        )
    return rows


def setup_costs(base: torch.nn.Module, refs: Callable, repeats: int = 3) -> list[tuple[str, float, float]]:
    """(what, median seconds, ratio to one forward + backward over the reference data)."""
    model = copy.deepcopy(base)
    named = trainable(model)

    def forward_backward() -> None:
        for batch in refs():
            model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    def si_setup() -> None:
        REGISTRY["si"].cls(REGISTRY["si"].config(name="si")).setup(SetupContext(model, refs, LR))

    rows = [
        {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids}
        for batch in refs()
        for ids in batch["input_ids"].tolist()
    ]

    def flow_setup() -> None:  # its weights: one forward over the training rows (here the reference rows)
        flow = REGISTRY["flow"].cls(REGISTRY["flow"].config(name="flow", batch_size=BATCH))
        flow.train_data(rows, None, 0)
        flow.setup(SetupContext(model, refs, LR))

    jobs = {"forward+backward (baseline)": forward_backward, "si setup (4 steps)": si_setup}
    jobs["flow setup (one forward over the rows)"] = flow_setup
    for estimator in ("sampled", "empirical", "exact"):
        jobs[f"ewc Fisher, {estimator}"] = lambda e=estimator: estimate_fisher(model, named, refs(), e)
    seconds: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeats):  # interleaved, like the step timings
        for name, job in jobs.items():
            start = time.perf_counter()
            job()
            seconds[name].append(time.perf_counter() - start)
    base_s = statistics.median(seconds["forward+backward (baseline)"])
    return [(name, statistics.median(s), statistics.median(s) / base_s) for name, s in seconds.items()]


TOP_K = 20  # eaft's default


def top_k_costs(positions: int, vocabs: tuple[int, ...] = (1000, 32000)) -> list[tuple[int, float, float]]:
    """(vocabulary, ms of torch.topk(TOP_K), ms of the fp32 cross-entropy) at each vocabulary size: torch's CPU top-k
    takes a slower path when k is large against the row, so eaft's share of a step depends on the vocabulary."""
    costs = []
    for vocab in vocabs:
        logits, labels = torch.randn(positions, vocab), torch.randint(0, vocab, (positions,))
        top_k = median_ms(lambda: logits.topk(TOP_K, -1))  # noqa: B023 (called within this iteration)
        ce = median_ms(lambda: torch.nn.functional.cross_entropy(logits, labels))  # noqa: B023
        costs.append((vocab, top_k, ce))
    return costs


def median_ms(job: Callable[[], Any], reps: int = 7) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        job()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=60, help="paired repetitions per regularizer")
    parser.add_argument("--seq", type=int, default=96, help="tokens per row of the training batches")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (more than the free cores makes OpenMP spin)"
    )
    parser.add_argument("--only", nargs="+", choices=CONFIGS, help="time only these rows (and the control), no setup")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = tiny_model("llama", "causal_lm", VOCAB, hidden_size=128, num_layers=4, num_heads=4)
    gen = torch.Generator().manual_seed(1)
    reference = [batch_of(gen, 64) for _ in range(REFERENCE_ROWS // BATCH)]
    refs = lambda shard=True: iter(reference)  # noqa: E731
    n_params = sum(p.numel() for p in base.parameters())
    print(f"tiny Llama, {n_params / 1e6:.2f}M parameters, batch {BATCH} x {args.seq} tokens, {args.threads} threads")
    print("\n| regularizer | step / plain step (median of pairs) | plain ms | regularized ms |")
    print("| --- | --- | --- | --- |")
    for name, ratio, plain_ms, reg_ms in step_overheads(base, refs, args.reps, args.seq, args.only):
        print(f"| {name} | {ratio:.3f}x | {plain_ms:.1f} | {reg_ms:.1f} |")
    if not args.only or "eaft" in args.only:
        print(f"\neaft's top-{TOP_K} against the cross-entropy it weights, {BATCH * args.seq} positions (median ms):")
        print("\n| vocabulary | top-k | cross-entropy | top-k / cross-entropy |\n| --- | --- | --- | --- |")
        for vocab, top_k, ce in top_k_costs(BATCH * args.seq):
            print(f"| {vocab} | {top_k:.2f} | {ce:.2f} | {top_k / ce:.2f}x |")
    if args.only:
        return
    print(f"\nSetup on {REFERENCE_ROWS} reference rows ({REFERENCE_ROWS // BATCH} batches of {BATCH} x 64):")
    print("\n| setup | seconds | / one forward+backward over the reference data |")
    print("| --- | --- | --- |")
    for name, seconds, ratio in setup_costs(base, refs):
        print(f"| {name} | {seconds:.3f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
