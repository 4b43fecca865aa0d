"""Packing: short rows packed into max_length keep their attention, positions and loss masks; the loss, evaluation
and the reference penalties (kl, distill) read a packed batch as they read the rows apart; a run with packing."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from tether.config import validate_config
from tether.data import IGNORE, Collator
from tether.errors import ConfigError
from tether.evaluate import dataset_metrics
from tether.packing import check_packing, pack, padding_share
from tether.regularizers import REGISTRY, RegularizerStack, SetupContext
from tether.run import evaluate_saved, train
from tether.synthetic import tiny_model

VOCAB = 48


def rows_of(n: int, seed: int) -> list[dict]:
    """Rows of 3..30 tokens, the first 2 a prompt without loss."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ids = [rng.randrange(4, VOCAB) for _ in range(rng.randint(3, 30))]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE] * 2 + ids[2:]})
    return rows


def model_of(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    model = tiny_model(arch, "causal_lm", VOCAB, hidden_size=16, num_layers=2, num_heads=2, seed=seed)
    model.config.use_cache = False  # as check_packing leaves it (and the Trainer in training)
    return model.eval()


def test_pack_puts_every_row_in_one_bin_with_restarting_positions():
    rows = rows_of(40, seed=0)
    packed = pack(rows, 32)
    assert all(len(p["input_ids"]) <= 32 for p in packed)
    assert sum(len(p["input_ids"]) for p in packed) == sum(len(r["input_ids"]) for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) / (32 * len(packed)) > 0.85  # best-fit decreasing fills bins
    pieces = []
    for p in packed:
        starts = [i for i, pos in enumerate(p["position_ids"]) if pos == 0] + [len(p["input_ids"])]
        for a, b in itertools.pairwise(starts):
            assert p["position_ids"][a:b] == list(range(b - a))
            assert p["labels"][a] == IGNORE  # not predicted from the row before
            pieces.append((tuple(p["input_ids"][a:b]), tuple(p["labels"][a + 1 : b])))
    assert sorted(pieces) == sorted((tuple(r["input_ids"]), tuple(r["labels"][1:])) for r in rows)


def test_packed_batches_have_no_attention_mask_and_padding_is_a_row_of_its_own():
    packed = pack(rows_of(12, seed=1), 32)
    batch = Collator(0)(packed[:3])
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    width = batch["input_ids"].shape[1]
    for i, p in enumerate(packed[:3]):
        n = len(p["input_ids"])
        assert batch["position_ids"][i, n:].tolist() == list(range(width - n))
        assert (batch["labels"][i, n:] == IGNORE).all()
    flat = Collator(0, flatten=True)(packed[:3])
    assert flat["input_ids"].shape == (1, sum(len(p["input_ids"]) for p in packed[:3]))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "gpt_neox"])
def test_eval_loss_is_the_same_packed_and_apart(arch):
    """The loss over the same rows, packed (both layouts) or padded one per batch row: equal within float tolerance."""
    model, rows = model_of(arch), rows_of(24, seed=2)
    apart = dataset_metrics(model, rows, Collator(0), batch_size=8)["loss"]
    packed = pack(rows, 64)
    assert dataset_metrics(model, packed, Collator(0), batch_size=4)["loss"] == pytest.approx(apart, rel=1e-5)
    assert dataset_metrics(model, packed, Collator(0, flatten=True), batch_size=4)["loss"] == pytest.approx(
        apart, rel=1e-5
    )
    with torch.no_grad():  # the model's own loss (what the Trainer trains on) on one batch of the same rows
        one = model(**Collator(0)(rows)).loss
        assert model(**Collator(0)(packed)).loss == pytest.approx(one.item(), rel=1e-5)


@pytest.mark.parametrize("name", ["kl", "distill"])
@pytest.mark.parametrize("lora", [False, True])
def test_reference_penalties_read_a_packed_batch_as_the_rows_apart(name, lora):
    model = model_of()
    check_packing(model, Collator(0))
    if lora:
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type=TaskType.CAUSAL_LM))
    stack = RegularizerStack.from_configs([REGISTRY[name].config(name=name, strength=1.0)])
    stack.setup(SetupContext(model, None, 1e-2))
    with torch.no_grad():  # the model moves away from the reference
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    rows = rows_of(10, seed=3)

    def penalty(batch: dict) -> float:
        stack.prefetch(batch)
        with torch.no_grad():
            return stack.penalty(model, batch, model(**batch)).item()

    apart = penalty(Collator(0)(rows))
    assert apart > 1e-4
    assert penalty(Collator(0)(pack(rows, 64))) == pytest.approx(apart, rel=1e-4)
    assert penalty(Collator(0, flatten=True)(pack(rows, 64))) == pytest.approx(apart, rel=1e-4)


def test_a_model_that_mixes_packed_rows_is_refused(monkeypatch):
    import transformers.masking_utils as masking

    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)  # attention spans rows
    with pytest.raises(ConfigError, match="does not keep packed rows apart: set data.packing false"):
        check_packing(model_of(), Collator(0))


def test_padding_share():
    assert padding_share([4, 4, 4, 4], 2) == 0
    assert padding_share([1, 3], 2) == pytest.approx(1 / 3)


def test_packing_is_refused_where_it_cannot_be_right(raw_config):
    raw_config["data"]["packing"] = True
    with pytest.raises(ConfigError, match="neftune scales its noise"):
        validate_config({**raw_config, "regularizers": [{"name": "neftune", "alpha": 5}]})
    raw_config["model"]["synthetic"]["arch"] = "bert"
    raw_config["data"]["format"] = "text"
    with pytest.raises(ConfigError, match="data.packing is for task causal_lm"):
        validate_config({**raw_config, "task": "sequence_classification", "regularizers": []})


def test_a_run_with_packing_and_kl_trains_and_evaluates_as_without(raw_config, tmp_path, capsys):
    from rich.console import Console

    raw_config["data"]["packing"] = True
    raw_config["training"].update(max_steps=4, eval_steps=2)
    raw_config["regularizers"] = [{"name": "kl", "strength": 0.1}]
    cfg = validate_config(raw_config)
    metrics = train(cfg, tmp_path / "run", console=Console(width=200))
    assert metrics["target"]["val_loss"] > 0
    out = capsys.readouterr().out
    assert "data train: 48 rows" in out and "packed into" in out and "full" in out
    packed = evaluate_saved(cfg, tmp_path / "run" / "model")
    apart = evaluate_saved(validate_config({**raw_config, "data": {**raw_config["data"], "packing": False}}),
                           tmp_path / "run" / "model")  # fmt: skip
    assert packed["target"]["val_loss"] == pytest.approx(apart["target"]["val_loss"], rel=1e-6)
