"""The order of a regularized step through the real RegularizedTrainer: optimizer groups built before setup (as
transformers does under FSDP2), a stack never set up, and the autograd penalties under gradient accumulation."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from transformers import TrainingArguments

from tether.config import RegularizerEntry
from tether.data import Collator
from tether.errors import TetherError
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
