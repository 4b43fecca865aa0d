"""The order of a regularized step through the real RegularizedTrainer: optimizer groups built before setup (as
transformers does under FSDP2), a stack never set up, and the autograd penalties under gradient accumulation."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainingArguments

from tether.config import RegularizerEntry
from tether.data import Collator
from tether.errors import ConfigError, TetherError
from tether.regularizers import RegularizerStack, SetupContext, parse_entries
from tether.regularizers.base import named_params_with_module, no_decay
from tether.synthetic import tiny_model
from tether.trainer import RegularizedTrainer

VOCAB = 48


def rows(n: int, seed: int = 0, prompt: int = 3) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(4, VOCAB) for _ in range(rng.randint(6, 14))]
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * prompt + ids[prompt:]})
    return out


def trainer_of(tmp_path: Path, names: list[str], steps: int = 1, **args: Any) -> RegularizedTrainer:
    model = tiny_model("llama", "causal_lm", VOCAB, hidden_size=16, num_layers=2, num_heads=2, seed=0)
    stack = RegularizerStack.from_configs(parse_entries([RegularizerEntry(name=n) for n in names]))
    kw = {"learning_rate": 1e-2, "per_device_train_batch_size": 4, "report_to": [], "use_cpu": True}
    kw["lr_scheduler_type"] = "constant"  # the groups keep their lr after the step, for the assertions
    training = TrainingArguments(str(tmp_path), max_steps=steps, save_strategy="no", **(kw | args))
    trainer = RegularizedTrainer(
        model=model, args=training, train_dataset=rows(16), data_collator=Collator(0), stack=stack
    )
    return trainer


def test_optimizer_groups_do_not_wait_for_setup(tmp_path: Path) -> None:
    """transformers builds the optimizer before FSDP2 shards the model, and tether sets up after the sharding (in
    create_scheduler): replayed here through the real Trainer, weight_decay must still exempt the norms and llrd
    still spread the learning rates (both came out wrong when groups were built from what setup recorded)."""
    trainer = trainer_of(tmp_path, ["weight_decay", "llrd"])
    set_up = []
    trainer.pending_setup = lambda: (
        set_up.append(trainer.optimizer) or trainer.stack.setup(SetupContext(trainer.model))
    )
    trainer.train()
    assert set_up == [trainer.optimizer]  # the optimizer existed when the deferred setup ran
    exempt = {id(p) for n, p, m in named_params_with_module(trainer.model) if no_decay(m, n, p)}
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            assert group["weight_decay"] == (0.0 if id(p) in exempt else 0.01), group["group"]
    assert len({group["lr"] for group in trainer.optimizer.param_groups}) == 4  # embeddings, 2 blocks, head


def test_a_stack_never_set_up_stops_the_first_step(tmp_path: Path) -> None:
    trainer = trainer_of(tmp_path, ["l2_sp"])
    with pytest.raises(TetherError, match="never set up"):
        trainer.train()


def label_smoothed(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, label_smoothing=0.2, reduction="sum")


def dft_weighted(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    nll = F.cross_entropy(logits, labels, reduction="none")  # 0 at -100
    return (torch.exp(-nll).detach() * nll).sum()


def step_by_hand(model: torch.nn.Module, groups: list[list[dict[str, Any]]], loss: Callable, lr: float) -> None:
    """One SGD step on the mean over `groups` of each group's token mean of `loss` (torch's, a row at a time)."""
    total = torch.zeros(())
    for group in groups:
        summed, positions = torch.zeros(()), 0
        for row in group:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(row["labels"][1:])
            summed = summed + loss(logits, labels)
            positions += int((labels != -100).sum())
        total = total + summed / positions / len(groups)
    total.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad


ACCUMULATED = [
    ("label_smoothing", 1, True), ("label_smoothing", 2, True), ("label_smoothing", 4, True),
    ("label_smoothing", 2, False), ("dft", 1, True), ("dft", 2, True), ("dft", 2, False),
]  # fmt: skip


@pytest.mark.parametrize(("name", "accumulation", "loss_count"), ACCUMULATED)
def test_under_accumulation_the_loss_is_weighted_as_the_trainers_own(
    tmp_path: Path, name: str, accumulation: int, loss_count: bool
) -> None:
    """A penalty (label_smoothing) or a shaped loss (dft: the stack's cross-entropy, the model run without labels) is
    a mean over its micro-batch's loss positions, weighted as the Trainer weighs its own loss: token-weighted over
    the accumulated batch when the model takes the loss count (a per-micro-batch 1/GA was 35 % off when the
    micro-batches' lengths differ), a per-micro-batch mean divided by GA once when it does not (it was divided
    twice). Oracle: torch's losses a row at a time."""
    data = rows(4, seed=3, prompt=2)
    data[0]["labels"][2:-2] = [-100] * len(data[0]["labels"][2:-2])  # few loss positions in one row, many in others
    micro = 4 // accumulation
    groups = [data] if loss_count else [data[i : i + micro] for i in range(0, 4, micro)]
    reference = tiny_model("llama", "causal_lm", VOCAB, hidden_size=16, num_layers=2, num_heads=2, seed=0)
    step_by_hand(reference, groups, label_smoothed if name == "label_smoothing" else dft_weighted, lr=0.5)
    trainer = trainer_of(
        tmp_path, [], per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation, optim="sgd",
        learning_rate=0.5, max_grad_norm=0.0,
    )  # fmt: skip
    strength = 0.2 if name == "label_smoothing" else 1.0
    trainer.stack = RegularizerStack.from_configs(parse_entries([RegularizerEntry(name=name, strength=strength)]))
    trainer.stack.setup(SetupContext(trainer.model))
    trainer.train_dataset = data
    trainer.model_accepts_loss_kwargs = loss_count
    trainer.train()
    for (param, got), want in zip(trainer.model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5, msg=param)


@pytest.mark.parametrize("own_loss", ["compute_loss_func", "label_smoothing_factor"])
def test_shaping_beside_a_loss_of_the_users_is_refused(tmp_path: Path, own_loss: str) -> None:
    """dft weights the model's cross-entropy: beside a loss the Trainer computes otherwise it would weight nothing
    the user asked for, so training stops before the first step, in one line."""
    trainer = trainer_of(
        tmp_path, ["dft"], **({"label_smoothing_factor": 0.1} if own_loss != "compute_loss_func" else {})
    )
    if own_loss == "compute_loss_func":
        trainer.compute_loss_func = lambda outputs, labels, num_items_in_batch=None: outputs.logits.mean()
    trainer.stack.setup(SetupContext(trainer.model))
    with pytest.raises(ConfigError, match="dft weights the model's cross-entropy, which compute_loss_func") as e:
        trainer.train()
    assert "\n" not in str(e.value)
