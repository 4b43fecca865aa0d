"""A classification head that loading initialized (missing from the checkpoint) is new: never anchored by l2_sp,
ewc or si, and trained at the full learning rate under llrd (Li et al. 2018 leave new layers out of L2-SP)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import set_seed

from tests.conftest import write_jsonl
from tether.config import validate_config
from tether.models import apply_lora, check_checkpoint, load_model
from tether.regularizers import RegularizerStack, SetupContext, parse_entries
from tether.regularizers.base import base_name
from tether.run import train
from tether.synthetic import char_tokenizer, tiny_model

ANCHORED = ["l2_sp", "ewc", "si"]


def saved_language_model(root: Path) -> Path:
    """A causal LM saved with save_pretrained, as a user's pre-trained checkpoint: it has no classification head."""
    tok = char_tokenizer()
    model = tiny_model("llama", "causal_lm", len(tok), hidden_size=32, num_layers=2, num_heads=4, pad_token_id=0)
    model.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    return root / "lm"


def sentiment_rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    words = {0: ["dull", "poor", "bad"], 1: ["great", "fine", "good"]}
    return [{"text": f"a {rng.choice(words[y])} film", "label": y} for y in (rng.randrange(2) for _ in range(n))]


def run_config(root: Path, model_dir: Path, regularizers: list[dict[str, Any]], lora: bool = False) -> Any:
    files = {split: write_jsonl(root / f"{split}.jsonl", sentiment_rows(24, i)) for i, split in enumerate(
        ("train", "validation", "reference"))}  # fmt: skip
    raw = {
        "model": {"path": str(model_dir)},
        "task": "sequence_classification",
        "data": {k: str(v) for k, v in files.items()} | {"format": "text", "max_length": 24},
        "training": {"learning_rate": 1e-2, "max_steps": 12, "per_device_train_batch_size": 8, "eval_steps": 12},
        "regularizers": regularizers,
    }
    if lora:
        raw["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    return validate_config(raw)


def test_loading_reports_the_head_it_initialized(tmp_path: Path) -> None:
    cfg = run_config(tmp_path, saved_language_model(tmp_path), [])
    assert load_model(cfg.model, cfg.task).new_parameters == {"score.weight"}
    causal = cfg.model.model_copy(update={"num_labels": 2})
    assert load_model(causal, "causal_lm").new_parameters == frozenset()  # every weight came from the checkpoint


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_new_head_is_not_anchored_and_gets_the_full_lr(tmp_path: Path, lora: bool) -> None:
    entries = [{"name": n} for n in (*ANCHORED, "llrd")]
    cfg = run_config(tmp_path, saved_language_model(tmp_path), entries, lora)
    model, _, new = load_model(cfg.model, cfg.task)
    if lora:
        model = apply_lora(model, cfg.lora, cfg.task)  # PEFT trains a copy of the head: modules_to_save.default
    batches = [{"input_ids": torch.randint(4, 90, (4, 10)), "attention_mask": torch.ones(4, 10, dtype=torch.long),
                "labels": torch.tensor([0, 1, 0, 1])}]  # fmt: skip
    stack = RegularizerStack.from_configs(parse_entries(cfg.regularizers), new_parameters=new)
    stack.setup(SetupContext(model, lambda shard=True: iter(batches), 1e-2))
    head = [p for n, p in model.named_parameters() if p.requires_grad and base_name(n) == "score.weight"]
    assert len(head) == 1
    for reg, _ in stack.items[:3]:
        assert all(p is not head[0] for p in reg.params), reg.name
        assert reg.params or getattr(reg, "lora", None), f"{reg.name} anchors the pre-trained tensors still"
    scales = {id(p): g["lr_scale"] for g in stack.param_groups(model) for p in g["params"]}
    assert scales[id(head[0])] == 1.0
    assert min(scales.values()) < 1.0  # llrd acts on the pre-trained blocks


def test_a_strong_pull_leaves_the_new_head_free_through_tether_train(tmp_path: Path) -> None:
    """l2_sp at lr * strength = 0.5 holds the pre-trained weights; the head moves as far as without the pull (before
    the fix it was pulled back to its random initialization every step)."""
    model_dir = saved_language_model(tmp_path)
    moved = {}
    for strength in (0.0, 50.0):
        cfg = run_config(tmp_path, model_dir, [{"name": "l2_sp", "strength": strength}])
        set_seed(0)  # the default training.seed: the head is initialized as in the run
        initial = load_model(cfg.model, cfg.task).model.score.weight.detach().clone()
        train(cfg, tmp_path / f"run{strength}")
        final = load_file(str(tmp_path / f"run{strength}" / "model" / "model.safetensors"))["score.weight"]
        moved[strength] = (final - initial).norm().item()
    assert moved[0.0] > 0
    assert moved[50.0] > 0.5 * moved[0.0], moved


@pytest.mark.parametrize("name", ["kl", "distill", "asft"])
def test_a_reference_with_a_random_new_head_is_refused(tmp_path: Path, name: str) -> None:
    """kl / distill compare with the model as loaded, whose new head is random: they pulled the predictions toward
    it; refused before training (and by validate), naming the head."""
    from tether.errors import ConfigError

    model_dir = saved_language_model(tmp_path)
    cfg = run_config(tmp_path, model_dir, [{"name": name}])
    with pytest.raises(ConfigError, match=rf"{name} compare the predictions .* loading initialized score.weight"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "model").exists()
    with pytest.raises(ConfigError, match=rf"{name} compare the predictions .* initialized the classification head"):
        check_checkpoint(cfg)
