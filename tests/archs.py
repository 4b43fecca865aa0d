"""Tiny random-init models of many architectures, built in code from transformers config classes (nothing is
downloaded), for tests/test_architectures.py. Sizes are the smallest each architecture accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

from tether.synthetic import char_tokenizer

SIZES = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}
KV = {"num_key_value_heads": 2}
MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 8, **KV}
# model_type: (task, config fields beyond SIZES)
DECODERS: dict[str, dict[str, Any]] = {
    "llama": KV,
    "mistral": KV,
    "qwen2": KV,
    "gemma": {"head_dim": 8, **KV},
    "gpt2": {"n_embd": 16, "n_layer": 2, "n_head": 2},
    "gpt_neox": {},
    "phi": {},
    "phi3": {},
    "opt": {"ffn_dim": 32, "word_embed_proj_dim": 16},
    "falcon": {},
    "bloom": {"n_layer": 2, "n_head": 2},
    "gptj": {"n_embd": 16, "n_layer": 2, "n_head": 2, "rotary_dim": 4},
    "stablelm": {"partial_rotary_factor": 0.5, **KV},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, **KV},
    "qwen2_moe": {"num_experts": 4, "shared_expert_intermediate_size": 8, **MOE},
    "qwen3_moe": {"num_experts": 4, "head_dim": 8, **MOE},
    "gemma3_text": {"head_dim": 8, **KV},
    "olmo2": KV,
    "granite": KV,
    "mamba": {"state_size": 4, "expand": 2, "conv_kernel": 2},
}
ENCODERS: dict[str, dict[str, Any]] = {
    "bert": {},
    "roberta": {},
    "distilbert": {"dim": 16, "n_layers": 2, "n_heads": 2, "hidden_dim": 32},
    "deberta-v2": {},
    "electra": {"embedding_size": 16},
    "xlm-roberta": {},
    "modernbert": {"global_attn_every_n_layers": 1, "local_attention": 8},
}
ARCHS = {**dict.fromkeys(DECODERS, "causal_lm"), **dict.fromkeys(ENCODERS, "sequence_classification")}


def tiny(arch: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A random-init model of `arch` over the char tokenizer's vocabulary (ids 0-2: pad, bos, eos); `overrides`
    change config fields."""
    vocab = len(char_tokenizer())
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    fields = {**SIZES, "vocab_size": vocab, "max_position_embeddings": 64, **ids, **{**DECODERS, **ENCODERS}[arch]}
    if arch in ("modernbert",):
        fields |= {"cls_token_id": 1, "sep_token_id": 2}
    fields |= overrides
    config = AutoConfig.for_model(arch, **fields)
    torch.manual_seed(seed)
    if ARCHS[arch] == "causal_lm":
        return AutoModelForCausalLM.from_config(config)
    config.num_labels = 2
    return AutoModelForSequenceClassification.from_config(config)


def saved(arch: str, root: Path) -> Path:
    """The tiny model saved with save_pretrained, with the char tokenizer, as a user's pre-trained checkpoint."""
    path = root / arch
    if not (path / "config.json").exists():
        tiny(arch).save_pretrained(path)
        char_tokenizer().save_pretrained(path)
    return path
