"""Fact recall: the share of prompts a causal LM completes with exactly the expected tokens, greedily."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tether.distributed import gathers_per_module, has_sharded_parameters, world_size
from tether.models import position_limit


def exact_match_recall(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    completions: list[str],
    batch_size: int = 64,
    advance: Callable[[int], None] | None = None,
) -> float:
    """Fraction of prompts whose greedy continuation starts with the tokens of its completion.

    The completion is tokenized on its own (no special tokens), so it should carry its leading space when the
    tokenizer marks word starts (" Pessa." rather than "Pessa."). Prompts are left-padded in batches so every row's
    continuation starts at the same column. The model's train/eval mode is restored afterwards. `advance(n)` is
    called after each batch of n prompts (a progress display).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions: pass one completion each")
    if not prompts:
        raise ValueError("no prompts to score: pass at least one prompt/completion pair")
    targets = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    for i, target in enumerate(targets):
        if not target:
            raise ValueError(f"completion {i} ({completions[i]!r}) has no tokens: every completion needs at least one")
    was_training = model.training
    model.eval()
    try:
        hits = 0
        for start in range(0, len(prompts), batch_size):
            chunk = targets[start : start + batch_size]
            generated = _greedy(model, tokenizer, prompts[start : start + batch_size], max(len(t) for t in chunk))
            hits += sum(row[: len(t)] == t for row, t in zip(generated, chunk))
            if advance is not None:
                advance(len(chunk))
    finally:
        model.train(was_training)
    return hits / len(prompts)


@torch.no_grad()
def _greedy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], n: int) -> list[list[int]]:
    # Padding by hand leaves tokenizer.padding_side alone, and works for tokenizers without a pad token (Llama's).
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token: set tokenizer.pad_token before scoring")
    ids = tokenizer(prompts)["input_ids"]
    limit = position_limit(model)
    if limit is not None:  # learned positions: a longer prompt would look up rows the table lacks; keep its end
        ids = [row[-max(1, limit.positions - n) :] for row in ids]
    width = max(len(row) for row in ids)
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in ids], device=device)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], device=device)
    out = model.generate(
        input_ids=input_ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=pad_id,
        synced_gpus=sharded(model),
    )  # fmt: skip
    return out[:, width:].tolist()


def sharded(model: PreTrainedModel) -> bool:
    """Whether every process holds a part of the weights (FSDP2, ZeRO-3), so that each generation step is a collective
    call: a process whose rows all ended would stop calling and leave the others waiting, unless generate keeps every
    process stepping until all are done (synced_gpus)."""
    return world_size() > 1 and (has_sharded_parameters(model) or gathers_per_module(model))
