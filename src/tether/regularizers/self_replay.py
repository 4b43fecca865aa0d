"""self_replay: rehearsal rows the original model writes itself, mixed into training as replay mixes its rows.

For when there is no pre-training data to replay (Self-Synthesized Rehearsal, arXiv 2403.01244; replaying the
model's own outputs on reference prompts, arXiv 2605.29495). Before training, the model as it will train but before
any step (the original: for LoRA the adapter is still fresh) samples `samples` rows:
  prompts: reference  one continuation per prompt of the reference rows (the tokens before the first one that
                      carries loss; a plain-text row gives its first token), the prompts in a seeded order, each once
                      before any repeats
  prompts: bos        unconditioned, from the model's BOS token (no data at all)
in batches of `batch_size`, each batch from its own seed (`seed` or the run's, and the batch's number), so a rerun
gives the same rows. A row is the prompt (no loss) and the generated tokens (loss), up to the EOS token, which is
kept. Filters: fewer than `min_new_tokens` new tokens, a perplexity under the original model (exp of the mean NLL of
the new tokens) above `max_perplexity`, and duplicates (the same tokens) are dropped. The kept rows are mixed in
like replay's (`ratio`, `by`; replay.mixed_in): the mixed set repeats rows when fewer were kept than the mix takes.

The generated rows are written batch by batch to RUN_DIR/self_replay.jsonl, under a key of the settings, the seed,
the prompts and the model's weights: a resumed run, or a run killed during generation and started again, reads the
batches already written and generates only the rest. With several processes the main one generates and the others
read the file. Counts (generated, dropped by each filter, kept, mixed in) go to metrics.json under `self_replay`.
Only tether train gives train_data the model (Regularizer.train_data): elsewhere setup refuses in one line.
strength is unused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from tether.data import IGNORE, Collator
from tether.distributed import barrier, is_main_process
from tether.errors import ConfigError, TetherError
from tether.outputs import write_jsonl
from tether.reference import evaluating
from tether.regularizers.base import FinishContext, Regularizer, SetupContext, register
from tether.regularizers.flow import per_row_loss
from tether.regularizers.replay import MixConfig, cycle_shuffled, mixed_in

CACHE = "self_replay.jsonl"  # in the run directory
Row = dict[str, Any]


class SelfReplayConfig(MixConfig):
    prompts: Literal["reference", "bos"] = "reference"
    """reference: continue the prompts of the reference rows; bos: generate unconditioned, from the BOS token."""
    samples: int | None = Field(None, ge=1)
    """Rows to generate; None: as many as the mix takes by examples (ratio / (1 - ratio) x the training rows)."""
    max_new_tokens: int = Field(64, ge=1)
    """Longest continuation, in tokens."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature (1: the model's own distribution)."""
    min_new_tokens: int = Field(2, ge=1)
    """Rows with fewer generated tokens (the EOS counted) are dropped."""
    max_perplexity: float = Field(100.0, gt=1)
    """Rows whose generated tokens have a higher perplexity under the original model are dropped (degenerate text)."""
    batch_size: int = Field(32, ge=1)
    """Rows generated together."""
    seed: int | None = None
    """Seed of the sampling; None: the run's."""

    def without_reference_data(self) -> str | None:
        if self.prompts == "reference":
            return "self_replay prompts: reference continues the reference rows: set data.reference, or prompts: bos"
        return None


@register("self_replay", SelfReplayConfig)
class SelfReplay(Regularizer):
    def __init__(self, config: SelfReplayConfig) -> None:
        self.config = config
        self.counts: dict[str, Any] = {}

    def train_data(
        self,
        train: list[dict],
        reference: list[dict] | None,
        seed: int,
        load: Callable[[str], list[dict]] | None = None,
        ctx: SetupContext | None = None,
    ) -> list[dict]:
        cfg = self.config
        if ctx is None:
            raise ConfigError("self_replay generates with the model: this caller gives train_data none (tether train)")
        if ctx.model.get_output_embeddings() is None or not ctx.model.can_generate():
            raise ConfigError("self_replay generates text: it needs a causal language model (task: causal_lm)")
        prompts = reference_prompts(reference) if cfg.prompts == "reference" else [[bos_id(ctx.model)]]
        if not prompts:
            raise ConfigError("self_replay prompts: reference found no reference rows: set data.reference")
        seed = seed if cfg.seed is None else cfg.seed
        n = cfg.samples or max(round(cfg.ratio / (1 - cfg.ratio) * len(train)), 1)
        generated = self.generate(ctx, list(islice(cycle_shuffled(prompts, seed), n)), seed)
        kept, dropped = filtered(generated, cfg)
        if not kept:
            raise ConfigError(
                f"self_replay: all {len(generated)} generated rows were filtered out ({dropped}): raise "
                "max_perplexity or lower min_new_tokens"
            )
        mixed, counts = mixed_in(train, kept, cfg, seed)
        self.counts = {"generated": len(generated), "dropped": dropped, "kept": len(kept), **counts}
        return mixed

    def setup(self, ctx: SetupContext) -> None:
        if not self.counts:
            raise ConfigError(
                "self_replay mixes generated rows into the training data: give the stack the training rows and the "
                "model (RegularizerStack.train_data(..., ctx=SetupContext(model))) before setup, as tether train does"
            )

    def after_training(self, model: nn.Module, ctx: FinishContext) -> dict[str, Any]:
        return self.counts

    def generate(self, ctx: SetupContext, prompts: list[list[int]], seed: int) -> list[Row]:
        """The rows for these prompts, batch by batch, from the cache where it holds them (module docstring)."""
        cfg = self.config
        batches = [prompts[i : i + cfg.batch_size] for i in range(0, len(prompts), cfg.batch_size)]
        settings = cfg.model_dump(include={"max_new_tokens", "temperature", "batch_size"})
        key = {**settings, "seed": seed, "prompts": digest(prompts), "model": fingerprint(ctx.model)}
        advance = ctx.progress(f"self_replay: generating {len(prompts)} rows", len(prompts)) if ctx.progress else None
        path = None if ctx.output_dir is None else ctx.output_dir / CACHE
        if path is not None and not is_main_process():
            barrier()  # the main process generates and writes them
            done = read_cache(path, None)  # whatever key it wrote: every process must mix the same rows
            if len(done) != len(batches):
                raise TetherError(f"self_replay: {path} holds {len(done)} of {len(batches)} batches after generation")
            return [row for batch in done for row in batch]
        done = read_cache(path, key) if path is not None else []
        if path is not None:
            write_jsonl(path, [{"key": key}, *({"batch": i, "rows": b} for i, b in enumerate(done))])
        for i, batch in enumerate(batches):
            if i >= len(done):
                done.append(sample(ctx.model, batch, cfg, seed * 1_000_003 + i))
                if path is not None:
                    append_line(path, {"batch": i, "rows": done[i]})
            if advance is not None:
                advance(len(batch))
        if path is not None:
            barrier()
        return [row for batch in done for row in batch]


def reference_prompts(reference: list[dict] | None) -> list[list[int]]:
    """Each reference row's prompt: its tokens before the first that carries loss (at least the first token)."""
    prompts = []
    for row in reference or []:
        labels = row["labels"]
        first = next((i for i, label in enumerate(labels) if label != IGNORE), 0)
        prompts.append(list(row["input_ids"][: max(first, 1)]))
    return prompts


def bos_id(model: nn.Module) -> int:
    bos = model.generation_config.bos_token_id
    bos = model.config.bos_token_id if bos is None else bos
    if bos is None:
        raise ConfigError("self_replay prompts: bos needs the model's bos_token_id (config): it has none")
    return bos if isinstance(bos, int) else bos[0]


def special_ids(model: nn.Module) -> tuple[int, set[int]]:
    """(pad id, EOS ids) of the model's generation config (pad: EOS when it has none)."""
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else model.config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    pad = gen.pad_token_id if gen.pad_token_id is not None else model.config.pad_token_id
    return (pad if pad is not None else min(eos_ids, default=0)), eos_ids


def sample(model: nn.Module, prompts: list[list[int]], cfg: SelfReplayConfig, seed: int) -> list[Row]:
    """One batch: left-padded prompts, sampled continuations cut after the first EOS, each row's NLL."""
    pad, eos_ids = special_ids(model)
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with evaluating(model), torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0,
            max_new_tokens=cfg.max_new_tokens, pad_token_id=pad, eos_token_id=sorted(eos_ids) or None,
        )  # fmt: skip
    rows = []
    for prompt, new in zip(prompts, out[:, width:].tolist()):
        end = next((i + 1 for i, t in enumerate(new) if t in eos_ids), len(new))
        new = new[:end]
        rows.append({"input_ids": prompt + new, "attention_mask": [1] * (len(prompt) + len(new)),
                     "labels": [IGNORE] * len(prompt) + new})  # fmt: skip
    for row, nll in zip(rows, row_nll(model, rows, pad)):
        row["nll"] = nll
    return rows


def row_nll(model: nn.Module, rows: list[Row], pad: int) -> list[float]:
    """Mean NLL of each row's loss tokens under the model (right-padded, one forward); nan for rows without any."""
    batch = {k: v.to(next(model.parameters()).device) for k, v in Collator(pad)(rows).items()}
    with evaluating(model), torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    counted = (batch["labels"][:, 1:] != IGNORE).sum(1)
    return per_row_loss(logits, batch["labels"]).masked_fill(counted == 0, math.nan).tolist()


def filtered(rows: list[Row], cfg: SelfReplayConfig) -> tuple[list[Row], dict[str, int]]:
    """The rows that pass the length, perplexity and duplicate filters (without their NLL), and the drops by filter."""
    kept, seen = [], set()
    dropped = {"short": 0, "perplexity": 0, "duplicate": 0}
    for row in rows:
        new = sum(label != IGNORE for label in row["labels"])
        key = tuple(row["input_ids"])
        if new < cfg.min_new_tokens:
            dropped["short"] += 1
        elif not math.exp(row["nll"]) <= cfg.max_perplexity:
            dropped["perplexity"] += 1
        elif key in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(key)
            kept.append({k: v for k, v in row.items() if k != "nll"})
    return kept, dropped


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


def fingerprint(model: nn.Module) -> str:
    """A digest of the model's weights (each tensor's sum and sum of squares): another model gets another cache."""
    with torch.no_grad():
        sums = [(p.double().sum().item(), p.double().square().sum().item()) for p in model.parameters()]
    return digest([f"{a:.12g},{b:.12g}" for a, b in sums])


def read_cache(path: Path | None, key: dict[str, Any] | None) -> list[list[Row]]:
    """The batches the cache holds for this key (None: any key), in order, up to the first missing or damaged line
    ([] if none)."""
    if path is None or not path.is_file():
        return []
    batches: list[list[Row]] = []
    for i, line in enumerate(lines(path)):
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            break
        if i == 0 and key is not None and record != {"key": key}:
            return []
        if i > 0 and record.get("batch") != i - 1:
            break
        if i > 0:
            batches.append(record["rows"])
    return batches


def lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        yield from f


def append_line(path: Path, record: dict[str, Any]) -> None:
    """One JSON line, flushed to disk before the next batch starts (a kill loses at most the batch being made)."""
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
