"""Every registered regularizer x {llama, gpt2, bert} x {full, LoRA} through the real RegularizedTrainer: it trains,
and where it acts inside the training step, switching it on changes the trained weights (off vs on, same seed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments

from tests.test_param_regularizers import VOCAB, rows_of
from tether.data import Collator
from tether.errors import ConfigError
from tether.regularizers import REGISTRY, RegularizerStack, SetupContext
from tether.synthetic import tiny_model
from tether.trainer import RegularizedTrainer

ARCHS = {"llama": "causal_lm", "gpt2": "causal_lm", "bert": "sequence_classification"}
STEPS, LR = 3, 1e-2
# name: its fields, switched on; acts_in_step False: it acts outside the step (the data before training, or models
# after it), which tests/test_train.py and tests/test_reference_regularizers.py check through `tether train`.
CASES: dict[str, tuple[dict[str, Any], bool]] = {
    "l1": ({"strength": 1e-2}, True),
    "l2": ({"strength": 1.0}, True),
    "l2_sp": ({"strength": 50.0}, True),
    "ewc": ({"strength": 100.0}, True),
    "si": ({"strength": 100.0}, True),
    "weight_decay": ({"strength": 0.5}, True),
    "llrd": ({"decay": 0.5}, True),
    "mofo": ({"fraction": 0.1}, True),
    "dropout": ({"attention": 0.5}, True),
    "neftune": ({"alpha": 5.0}, True),
    "distill": ({"strength": 1.0}, True),
    "kl": ({"strength": 1.0}, True),
    "label_smoothing": ({"strength": 0.3}, True),
    "dft": ({"strength": 1.0}, True),
    "eaft": ({"strength": 1.0}, True),
    "asft": ({"strength": 1.0, "anchor": 1.0}, True),
    "flow": ({"strength": 1.0, "temperature": 0.05}, True),
    "replay": ({}, False),
    "ema": ({}, False),
    "intruder": ({}, False),
    "wise_ft": ({"alphas": [0.5]}, False),
    "merge": ({"alphas": [0.5]}, False),
    "self_replay": ({"ratio": 0.25, "max_new_tokens": 4, "max_perplexity": 1e9}, False),
}
PLAIN: dict[tuple[str, bool], dict[str, torch.Tensor]] = {}  # the run without regularizers, per architecture and LoRA


def test_the_table_covers_every_registered_regularizer() -> None:
    assert set(CASES) == set(REGISTRY)


def trained(
    tmp_path: Path, name: str | None, fields: dict[str, Any], arch: str, lora: bool
) -> dict[str, torch.Tensor]:
    """The trainable weights after STEPS optimizer steps of RegularizedTrainer with one regularizer (or none)."""
    task = ARCHS[arch]
    model = tiny_model(arch, task, VOCAB, hidden_size=16, num_layers=2, num_heads=2, seed=0)
    if lora:
        kind = "CAUSAL_LM" if task == "causal_lm" else "SEQ_CLS"
        model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", task_type=kind))
    stack = RegularizerStack.from_configs([REGISTRY[name].config(name=name, **fields)] if name else [])
    args = TrainingArguments(
        str(tmp_path), max_steps=STEPS, learning_rate=LR, per_device_train_batch_size=4, save_strategy="no",
        report_to=[], use_cpu=True, seed=0, lr_scheduler_type="constant",
    )  # fmt: skip
    collate = Collator(0)
    reference_rows = rows_of(4, task, 2)
    # as tether.run and tether.api do (tether.run also gives the model: self_replay generates with it)
    train_rows = stack.train_data(rows_of(12, task, 1), reference_rows, 0, ctx=SetupContext(model))
    trainer = RegularizedTrainer(model=model, args=args, train_dataset=train_rows, data_collator=collate, stack=stack)
    reference = [collate(reference_rows[i : i + 2]) for i in (0, 2)]
    stack.setup(SetupContext(trainer.model, lambda shard=True: iter(reference), LR))
    trainer.train()
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    return weights


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_regularizer_acts_through_the_trainer(tmp_path: Path, name: str, arch: str, lora: bool) -> None:
    fields, acts_in_step = CASES[name]
    if name == "self_replay" and ARCHS[arch] != "causal_lm":
        pytest.skip("self_replay generates text: refused for classifiers (tests/test_self_replay.py)")
    if name == "intruder" and not lora:  # LoRA only: refused at setup, as from the config
        with pytest.raises(ConfigError, match="intruder reduces a LoRA adapter's intruder dimensions"):
            trained(tmp_path / "on", name, fields, arch, lora)
        return
    on = trained(tmp_path / "on", name, fields, arch, lora)
    if not acts_in_step:
        return  # it ran beside the step without breaking it
    if (arch, lora) not in PLAIN:
        PLAIN[arch, lora] = trained(tmp_path / "plain", None, {}, arch, lora)
    plain = PLAIN[arch, lora]
    assert plain.keys() == on.keys()
    changed = [n for n in plain if not torch.equal(plain[n], on[n])]
    assert changed, f"{name} on {arch} ({'LoRA' if lora else 'full'}): the same weights as without it"
