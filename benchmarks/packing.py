"""Training tokens per second with and without `data.packing`, on real-length English text.

    .venv/bin/python benchmarks/packing.py [--rows 600] [--max-length 512] [--repeats 2] [--threads 1]

The rows are the paragraphs of Python's own documentation topics (`pydoc_data.topics`, shipped with Python: real
text of real lengths, 20 to a few thousand characters; longer ones become windows of max_length). Each run is a
whole `tether train` through tether.run.train: a synthetic tiny Llama (character tokens, hidden 128, 2 layers) for
one epoch over the same rows at batch size 8, with no evaluation or checkpoint during training. Tokens/s counts the
real (non-padding) tokens of the epoch over the Trainer's training time (tether's train_runtime_s); the padding share
is that of the batches each run trains on (a seeded shuffle, each batch padded to its longest row; packed: the
packed examples). Runs alternate (plain, packed, plain, ...) and the median of `--repeats` is shown, so that the load
of other processes falls on both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from tether.config import validate_config
from tether.data import load_split
from tether.packing import pack, padding_share
from tether.run import train
from tether.synthetic import char_tokenizer

BATCH = 8


def paragraphs(n: int) -> list[str]:
    """The first n paragraphs (at least 20 characters) of the documentation topics, in sorted topic order."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    return [p.strip() for p in text.split("\n\n") if len(p.strip()) >= 20][:n]


def config(data: dict[str, Path], max_length: int, packing: bool, out: Path) -> dict:
    return {
        "model": {"synthetic": {"arch": "llama", "hidden_size": 128, "num_layers": 2, "num_heads": 4}},
        "data": {"train": str(data["train"]), "validation": str(data["val"]), "format": "text"}
        | {"max_length": max_length, "packing": packing},
        "training": {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": BATCH}
        | {"eval_strategy": "no", "save_strategy": "no", "logging_steps": 1000},
        "output_dir": str(out),
    }


def measure(root: Path, rows: int, max_length: int, repeats: int) -> tuple[list, list, dict[bool, list[float]]]:
    """The training examples, their packed form and each run's training time (plain and packed, alternating)."""
    texts = paragraphs(rows + 20)
    data = {"train": root / "train.jsonl", "val": root / "val.jsonl"}
    data["train"].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:-20]))
    data["val"].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[-20:]))
    examples = load_split(str(data["train"]), "train", "text", "causal_lm", char_tokenizer(), max_length).encoded
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(repeats):
        for packing in (False, True):
            out = root / f"run-{int(packing)}-{i}"
            metrics = train(validate_config(config(data, max_length, packing, out)), out)
            times[packing].append(metrics["train_runtime_s"])
    return examples, pack(examples, max_length), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="tether-packing-") as tmp:
        examples, packed, times = measure(Path(tmp), args.rows, args.max_length, args.repeats)
    lengths = [len(e["input_ids"]) for e in examples]
    tokens = sum(lengths)
    share = {False: padding_share(lengths, BATCH), True: padding_share([len(e["input_ids"]) for e in packed], BATCH)}
    print(f"{args.rows} paragraphs -> {len(examples)} examples, {tokens:,} tokens; max_length {args.max_length}, "
          f"batch {BATCH}, {args.threads} thread(s), median of {args.repeats}")  # fmt: skip
    print("| packing | examples | padding share | train time s | tokens/s |")
    print("| --- | --- | --- | --- | --- |")
    for packing, n in ((False, len(examples)), (True, len(packed))):
        t = statistics.median(times[packing])
        print(f"| {'on' if packing else 'off'} | {n} | {share[packing]:.1%} | {t:.1f} | {tokens / t:,.0f} |")
    speedup = statistics.median(times[False]) / statistics.median(times[True])
    print(f"packing: {speedup:.2f}x the tokens/s")


if __name__ == "__main__":
    main()
