"""The order of a regularized step through the real RegularizedTrainer: optimizer groups built before setup (as
transformers does under FSDP2), a stack never set up, and the autograd penalties under gradient accumulation."""

from __future__ import annotations

import random
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


def smoothed_step_by_hand(model: torch.nn.Module, batch: list[dict[str, Any]], alpha: float, lr: float) -> None:
    """One SGD step on torch's label-smoothed cross-entropy, token mean over the whole batch, row by row."""
    total, positions = 0.0, 0
    for row in batch:
        logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
        labels = torch.tensor(row["labels"][1:])
        total = total + F.cross_entropy(logits, labels, label_smoothing=alpha, reduction="sum")
        positions += int((labels != -100).sum())
    (total / positions).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad


@pytest.mark.parametrize("accumulation", [1, 2, 4])
def test_label_smoothing_under_accumulation_is_torchs_over_the_whole_batch(tmp_path: Path, accumulation: int) -> None:
    """The task loss under accumulation is token-weighted over the whole accumulated batch; a penalty weighted per
    micro-batch mean instead (x 1/GA) was 35 % off this oracle when the micro-batches' lengths differ."""
    data = rows(4, seed=3, prompt=2)
    data[0]["labels"][2:-2] = [-100] * len(data[0]["labels"][2:-2])  # few loss positions in one row, many in others
    reference = tiny_model("llama", "causal_lm", VOCAB, hidden_size=16, num_layers=2, num_heads=2, seed=0)
    smoothed_step_by_hand(reference, data, alpha=0.2, lr=0.5)
    trainer = trainer_of(
        tmp_path, [], per_device_train_batch_size=4 // accumulation, gradient_accumulation_steps=accumulation,
        optim="sgd", learning_rate=0.5, max_grad_norm=0.0,
    )  # fmt: skip
    trainer.stack = RegularizerStack.from_configs(
        parse_entries([RegularizerEntry(name="label_smoothing", strength=0.2)])
    )
    trainer.stack.setup(SetupContext(trainer.model))
    trainer.train_dataset = data
    trainer.train()
    for (name, got), want in zip(trainer.model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5, msg=name)


def test_label_smoothing_when_the_model_takes_no_loss_count(tmp_path: Path) -> None:
    """A model whose forward takes no num_items_in_batch gives a mean per micro-batch, which the Trainer divides by
    the accumulation steps: the penalty must be weighted the same, once (it was divided by GA twice: 1 % off)."""
    data = rows(4, seed=3, prompt=2)
    reference = tiny_model("llama", "causal_lm", VOCAB, hidden_size=16, num_layers=2, num_heads=2, seed=0)
    total = torch.zeros(())
    for micro_batch in (data[:2], data[2:]):
        loss, positions = torch.zeros(()), 0
        for row in micro_batch:
            logits = reference(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(row["labels"][1:])
            loss = loss + F.cross_entropy(logits, labels, label_smoothing=0.2, reduction="sum")
            positions += int((labels != -100).sum())
        total = total + loss / positions / 2
    total.backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.5 * p.grad
    trainer = trainer_of(
        tmp_path, [], per_device_train_batch_size=2, gradient_accumulation_steps=2, optim="sgd", learning_rate=0.5,
        max_grad_norm=0.0,
    )  # fmt: skip
    trainer.stack = RegularizerStack.from_configs(
        parse_entries([RegularizerEntry(name="label_smoothing", strength=0.2)])
    )
    trainer.stack.setup(SetupContext(trainer.model))
    trainer.train_dataset = data
    trainer.model_accepts_loss_kwargs = False
    trainer.train()
    for (name, got), want in zip(trainer.model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize(("accumulation", "loss_count"), [(1, True), (2, True), (2, False)])
def test_dft_through_the_trainer_is_the_token_weighted_loss_of_the_whole_batch(
    tmp_path: Path, accumulation: int, loss_count: bool
) -> None:
    """dft's shaped loss (the stack's cross-entropy, the model run without labels) is weighted as the Trainer weighs
    its own: token-weighted over the accumulated batch when the model takes the loss count, per micro-batch mean
    divided by the accumulation steps when it does not. Oracle: torch's cross-entropy, a row at a time."""
    data = rows(4, seed=3, prompt=2)
    data[0]["labels"][2:-2] = [-100] * len(data[0]["labels"][2:-2])
    reference = tiny_model("llama", "causal_lm", VOCAB, hidden_size=16, num_layers=2, num_heads=2, seed=0)
    micro = 4 // accumulation
    total = torch.zeros(())
    for start in range(0, 4, micro) if not loss_count else [0]:
        terms, positions = torch.zeros(()), 0
        for row in data[start : start + (micro if not loss_count else 4)]:
            logits = reference(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(row["labels"][1:])
            nll = F.cross_entropy(logits, labels, reduction="none")  # 0 at -100
            terms = terms + (torch.exp(-nll).detach() * nll).sum()
            positions += int((labels != -100).sum())
        total = total + terms / positions / (accumulation if not loss_count else 1)
    total.backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.5 * p.grad
    trainer = trainer_of(
        tmp_path, [], per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation, optim="sgd",
        learning_rate=0.5, max_grad_norm=0.0,
    )  # fmt: skip
    trainer.stack = RegularizerStack.from_configs(parse_entries([RegularizerEntry(name="dft", strength=1.0)]))
    trainer.stack.setup(SetupContext(trainer.model))
    trainer.train_dataset = data
    trainer.model_accepts_loss_kwargs = loss_count
    trainer.train()
    for (name, got), want in zip(trainer.model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5, msg=name)


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
