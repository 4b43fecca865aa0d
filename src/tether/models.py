"""Loading the model and tokenizer to fine-tune (from a path or hub id, or a synthetic tiny one), and LoRA."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from tether.config import LoraSection, ModelConfig
from tether.errors import ConfigError

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(cfg: ModelConfig, task: str) -> tuple[nn.Module, Any]:
    """(model, tokenizer); the tokenizer always has a pad token and the model config knows its id."""
    if cfg.synthetic is not None:
        model, tokenizer = _synthetic(cfg, task)
    else:
        model, tokenizer = _pretrained(cfg, task)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder-only checkpoints often ship without one
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _synthetic(cfg: ModelConfig, task: str) -> tuple[nn.Module, Any]:
    from tether.synthetic import char_tokenizer, tiny_model

    s = cfg.synthetic
    tok = char_tokenizer()
    ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    try:
        model = tiny_model(
            s.arch, task, len(tok), hidden_size=s.hidden_size, num_layers=s.num_layers, num_heads=s.num_heads,
            seed=s.seed, num_labels=cfg.num_labels, **ids,
        )  # fmt: skip
    except ValueError as e:
        raise ConfigError(f"model.synthetic: {e}") from None
    return model.to(DTYPES[cfg.dtype]), tok


def _pretrained(cfg: ModelConfig, task: str) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if cfg.trust_remote_code:
        log.warning("model.trust_remote_code is on: code shipped with %s will run on this machine", cfg.path)
    kwargs = {"trust_remote_code": cfg.trust_remote_code, "dtype": DTYPES[cfg.dtype]}
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
        if task == "causal_lm":
            model = AutoModelForCausalLM.from_pretrained(cfg.path, **kwargs)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(cfg.path, num_labels=cfg.num_labels, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.path: cannot load '{cfg.path}': {first}") from None
    return model, tokenizer


def apply_lora(model: nn.Module, cfg: LoraSection, task: str) -> nn.Module:
    """Wrap the model in a fresh PEFT LoRA adapter; only the adapter (and a classifier head) trains."""
    from peft import LoraConfig, TaskType, get_peft_model

    task_type = TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.SEQ_CLS
    lora = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules, task_type=task_type
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        raise ConfigError(f"lora.target_modules: {str(e).splitlines()[0]}") from None
