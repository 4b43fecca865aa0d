"""tether inside TRL's trainers (trl in the dev extras): SFTTrainer with every kind of regularizer; DPOTrainer,
GRPOTrainer, KTOTrainer and RewardTrainer with the parameter-space, optimizer-level and model-level ones; what cannot
apply beside them is refused.

Each regularizer's effect is shown on the trained weights (strength 0, or no regularizer, against > 0), never on a
logged value: a penalty that is logged but not in the gradient changes no weight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset
from peft import LoraConfig
from trl import (
    DPOConfig,
    DPOTrainer,
    GRPOConfig,
    GRPOTrainer,
    KTOConfig,
    KTOTrainer,
    RewardConfig,
    RewardTrainer,
    SFTConfig,
    SFTTrainer,
)

import tether
from tether.errors import TetherError
from tether.synthetic import char_tokenizer, tiny_model

TOKENIZER = char_tokenizer()
FACTS = [{"prompt": f"The color of item {i} is", "completion": f" c{i % 5}."} for i in range(8)]
SFT_DATA = {
    "text": [{"text": f"{a}+1={a + 1}"} for a in range(16)],
    "prompt_completion": [{"prompt": f"{a}+1=", "completion": str(a + 1)} for a in range(16)],
    "conversational": [
        {"messages": [{"role": "user", "content": f"{a}+1?"}, {"role": "assistant", "content": str(a + 1)}]}
        for a in range(16)
    ],
}
COMMON = dict(per_device_train_batch_size=4, report_to=[], use_cpu=True, logging_steps=1, learning_rate=1e-2,
              disable_tqdm=True, seed=0, save_strategy="no")  # fmt: skip
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def model() -> Any:
    return tiny_model("llama", "causal_lm", len(TOKENIZER), hidden_size=32)


def trained(trainer: Any) -> torch.Tensor:
    trainer.train()
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters() if p.requires_grad])


def sft(out: Path, regularizers: list, data: str = "prompt_completion", peft: bool = False, **args: Any) -> Any:
    config = SFTConfig(output_dir=str(out), max_length=32, **(COMMON | {"max_steps": 3} | args))
    trainer = SFTTrainer(model=model(), args=config, train_dataset=Dataset.from_list(SFT_DATA[data]),
                         processing_class=TOKENIZER, peft_config=LORA if peft else None)  # fmt: skip
    return tether.regularize(trainer, regularizers, reference=FACTS)


def dpo(out: Path, regularizers: list, **args: Any) -> Any:
    rows = [{"prompt": f"{a}+1=", "chosen": str(a + 1), "rejected": str(a + 2)} for a in range(16)]
    config = DPOConfig(output_dir=str(out), max_length=32, **(COMMON | {"max_steps": 3} | args))
    trainer = DPOTrainer(model=model(), ref_model=model(), args=config, train_dataset=Dataset.from_list(rows),
                         eval_dataset=Dataset.from_list(rows[:4]), processing_class=TOKENIZER)  # fmt: skip
    return tether.regularize(trainer, regularizers, reference=FACTS)


def grpo(out: Path, regularizers: list, **args: Any) -> Any:
    def reward(completions: list[str], **_: Any) -> list[float]:
        return [float(sum(map(ord, c)) % 7) for c in completions]  # varies, so the advantages are not all zero

    config = GRPOConfig(
        output_dir=str(out), max_steps=2, num_generations=2, max_completion_length=4, **(COMMON | args)
    )
    rows = Dataset.from_list([{"prompt": f"{a}+1="} for a in range(8)])
    trainer = GRPOTrainer(model=model(), args=config, train_dataset=rows, processing_class=TOKENIZER,
                          reward_funcs=reward)  # fmt: skip
    return tether.regularize(trainer, regularizers, reference=FACTS)


def kto(out: Path, regularizers: list, **args: Any) -> Any:
    rows = [{"prompt": f"{a}+1=", "completion": str(a + 1 + a % 2), "label": a % 2 == 0} for a in range(16)]
    config = KTOConfig(output_dir=str(out), max_length=32, **(COMMON | {"max_steps": 3} | args))
    trainer = KTOTrainer(model=model(), ref_model=model(), args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=TOKENIZER)  # fmt: skip
    return tether.regularize(trainer, regularizers, reference=FACTS)


def reward(out: Path, regularizers: list, reference: Any = None, **args: Any) -> Any:
    rows = [{"chosen": f"{a}+1={a + 1}", "rejected": f"{a}+1={a + 2}"} for a in range(16)]
    scorer = tiny_model("llama", "sequence_classification", len(TOKENIZER), hidden_size=32, num_labels=1)
    scorer.config.pad_token_id = TOKENIZER.pad_token_id
    config = RewardConfig(output_dir=str(out), max_length=32, **(COMMON | {"max_steps": 3} | args))
    trainer = RewardTrainer(model=scorer, args=config, train_dataset=Dataset.from_list(rows),
                            eval_dataset=Dataset.from_list(rows[:4]), processing_class=TOKENIZER)  # fmt: skip
    return tether.regularize(trainer, regularizers, reference=reference)


@pytest.mark.parametrize(
    ("name", "data"),
    [("kl", "text"), ("distill", "prompt_completion"), ("label_smoothing", "conversational"), ("dft", "text")],
)
def test_sft_autograd_penalties_change_the_weights_in_one_forward(tmp_path: Path, name: str, data: str) -> None:
    """kl / distill / label_smoothing / dft under SFTTrainer: the penalty (dft: the weights) goes through the
    gradient (the weights differ from strength 0), from the outputs of the one forward that makes the loss (one
    model forward per micro-batch)."""
    runs = []
    for strength in (0.0, 0.5):
        trainer = sft(tmp_path / str(strength), [{"name": name, "strength": strength}], data)
        calls = []
        hook = trainer.model.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        runs.append(trained(trainer))
        hook.remove()
        assert len(calls) == 3  # 3 steps x 1 micro-batch: no second forward for the logits
    assert not torch.equal(*runs)


@pytest.mark.parametrize("name", ["label_smoothing", "dft"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_sft_task_loss_is_trls_own(tmp_path: Path, accumulation: int, name: str) -> None:
    """With an autograd penalty at strength 0 the regularized SFT step (the model's own loss, one forward) trains as
    TRL's fused NLL does, under gradient accumulation too: the same loss, scaled the same way; so does dft's shaped
    loss at strength 0 (the stack's cross-entropy, the model run without labels)."""
    # SGD: Adam's normalized steps would magnify the rounding of the fused against the plain cross-entropy
    args = {
        "gradient_accumulation_steps": accumulation,
        "per_device_train_batch_size": 4 // accumulation,
        "optim": "sgd",
    }
    config = SFTConfig(output_dir=str(tmp_path / "trl"), max_length=32, **(COMMON | {"max_steps": 3} | args))
    plain = SFTTrainer(model=model(), args=config, train_dataset=Dataset.from_list(SFT_DATA["prompt_completion"]),
                       processing_class=TOKENIZER)  # fmt: skip
    regularized = sft(tmp_path / "tether", [{"name": name, "strength": 0.0}], **args)
    torch.testing.assert_close(trained(plain), trained(regularized), rtol=1e-4, atol=1e-5)


def test_sft_with_trl_peft_config_and_replay(tmp_path: Path) -> None:
    """TRL wraps the model in LoRA; tether sets up on the wrapped model (kl's reference: adapters disabled, no full
    copy; l2_sp pulls the adapter) and replay's rows are prepared as TRL prepares the training rows."""
    runs = []
    for strength in (0.0, 1.0):
        regs = [{"name": "kl", "strength": 0.1}, {"name": "l2_sp", "strength": strength}, {"name": "replay"}]
        trainer = sft(tmp_path / str(strength), regs, peft=True)
        assert trainer.stack.reference.mode == "disable"
        assert len(trainer.train_dataset) == 16 + 2  # replay's 10%: round(16 / 9) rows
        runs.append(trained(trainer))
    assert not torch.equal(*runs)


def test_sft_checkpoints_save_and_resume_with_the_stack_state(tmp_path: Path) -> None:
    """TRL writes its model card beside the checkpoint (not into tether's staging folder); resuming through
    train(resume_from_checkpoint=...) restores the EMA average, so the resumed run ends where the whole one does."""
    regs = [{"name": "ema", "decay": 0.5}, {"name": "l2_sp", "strength": 0.01}]
    whole = sft(tmp_path / "whole", regs, max_steps=4, save_strategy="steps", save_steps=2)
    whole.train()
    assert {p.name for p in (tmp_path / "whole").iterdir()} == {"README.md", "checkpoint-2", "checkpoint-4"}
    assert "model_name: whole" in (tmp_path / "whole" / "README.md").read_text()  # the run's name, not the staging's
    resumed = sft(tmp_path / "resumed", regs, max_steps=4, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    ema_whole, ema_resumed = whole.stack.items[0][0], resumed.stack.items[0][0]
    assert ema_resumed.steps == ema_whole.steps == 4
    for a, b in zip(ema_whole.shadow, ema_resumed.shadow):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["kl", "distill", "label_smoothing", "replay", "dft"])
def test_dpo_refuses_what_cannot_apply(tmp_path: Path, name: str) -> None:
    with pytest.raises(TetherError, match="beside DPOTrainer's loss.*use its beta") as e:
        dpo(tmp_path, [{"name": name}])
    assert "\n" not in str(e.value)


PARAM_SPACE = [
    {"name": "l2_sp", "strength": 1.0},
    {"name": "ewc", "strength": 100.0},
    {"name": "si", "strength": 100.0},
    {"name": "l1", "strength": 0.1},
    {"name": "l2", "strength": 1.0},
    {"name": "weight_decay", "strength": 10.0},
    {"name": "llrd", "decay": 0.5},
]


def test_dpo_parameter_space_and_optimizer_regularizers_change_the_weights(tmp_path: Path) -> None:
    plain = trained(dpo(tmp_path / "plain", [], max_steps=2))
    assert torch.equal(plain, trained(dpo(tmp_path / "again", [], max_steps=2)))  # the comparison below is not noise
    for entry in PARAM_SPACE:
        regularized = trained(dpo(tmp_path / entry["name"], [entry], max_steps=2))
        assert not torch.equal(plain, regularized), entry["name"]


def test_dpo_ema_and_wise_ft_models(tmp_path: Path) -> None:
    """ema, wise_ft and merge at the end of a DPO run (tether.finish): measured on the eval data, saved; the
    checkpoint (with the EMA state) is saved beside TRL's model card."""
    regs = [{"name": "ema", "decay": 0.5}, {"name": "wise_ft", "alphas": [0.0, 1.0]}, {"name": "merge"}]
    trainer = dpo(tmp_path, regs, save_strategy="steps", save_steps=3)
    trainer.train()
    assert (tmp_path / "checkpoint-3" / "tether_state.safetensors").is_file() and (tmp_path / "README.md").is_file()
    results = tether.finish(trainer)
    assert results["ema"]["steps"] == 3 and "delta_loss" in results["ema"]["forgetting"]
    assert [row["alpha"] for row in results["wise_ft"]["alphas"]] == [0.0, 1.0]
    assert (tmp_path / "model_ema" / "model.safetensors").is_file()
    assert (tmp_path / "model_wise_ft").is_dir()
    assert results["merge"]["candidates"] and (tmp_path / "model_merge").is_dir()


def test_grpo_regularizers_change_the_weights_and_kl_is_refused(tmp_path: Path) -> None:
    plain = trained(grpo(tmp_path / "plain", []))
    assert torch.equal(plain, trained(grpo(tmp_path / "again", [])))  # sampling is seeded: the comparison holds
    for entry in ({"name": "l2_sp", "strength": 10.0}, {"name": "weight_decay", "strength": 10.0}):
        assert not torch.equal(plain, trained(grpo(tmp_path / entry["name"], [entry]))), entry["name"]
    with pytest.raises(TetherError, match="beside GRPOTrainer's loss.*use its beta"):
        grpo(tmp_path / "kl", [{"name": "kl"}])


MODEL_LEVEL = [{"name": "neftune", "alpha": 50.0}, {"name": "mofo"}]


def test_dpo_model_level_regularizers_change_the_weights(tmp_path: Path) -> None:
    """neftune and mofo under DPO; tether's dropout once DPO's own disable_dropout is off (it is refused beside it:
    test_dropout_beside_trls_disable_dropout_is_refused)."""
    plain = trained(dpo(tmp_path / "plain", [], max_steps=2))
    for entry in MODEL_LEVEL:
        assert not torch.equal(plain, trained(dpo(tmp_path / entry["name"], [entry], max_steps=2))), entry["name"]
    plain = trained(dpo(tmp_path / "on", [], max_steps=2, disable_dropout=False))
    dropout = [{"name": "dropout", "attention": 0.5}]
    assert not torch.equal(plain, trained(dpo(tmp_path / "dropout", dropout, max_steps=2, disable_dropout=False)))


@pytest.mark.parametrize("build", [dpo, kto, reward, lambda out, regs: grpo(out, regs, disable_dropout=True)])
def test_dropout_beside_trls_disable_dropout_is_refused(tmp_path: Path, build: Any) -> None:
    """TRL switches dropout off on purpose (DPO, KTO and reward by default, GRPO when asked): tether's dropout would
    switch it back on; refused in one line naming the switch (GRPO's default leaves dropout on: accepted)."""
    refusal = (
        r"dropout: \w+Trainer turns dropout off \(disable_dropout=True\).*set disable_dropout=False in its config"
    )
    with pytest.raises(TetherError, match=refusal + " to use tether's dropout, or remove dropout") as e:
        build(tmp_path / "refused", [{"name": "dropout", "attention": 0.1}])
    assert "\n" not in str(e.value)
    grpo(tmp_path / "accepted", [{"name": "dropout", "attention": 0.1}])


def test_a_users_subclass_of_dpo_keeps_dpos_refusals(tmp_path: Path) -> None:
    """A DPOTrainer subclass with its own compute_loss still has DPO's loss: kl is refused as beside DPOTrainer."""

    class MyDPO(DPOTrainer):
        def compute_loss(self, *args: Any, **kwargs: Any) -> Any:
            return super().compute_loss(*args, **kwargs)

    config = DPOConfig(output_dir=str(tmp_path), max_length=32, **COMMON)
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}] * 4
    trainer = MyDPO(model=model(), ref_model=model(), args=config, train_dataset=Dataset.from_list(rows),
                    processing_class=TOKENIZER)  # fmt: skip
    with pytest.raises(TetherError, match="kl cannot apply beside DPOTrainer's loss"):
        tether.regularize(trainer, [{"name": "kl"}], reference=FACTS)


def test_kto_regularizers_change_the_weights_and_kl_is_refused(tmp_path: Path) -> None:
    plain = trained(kto(tmp_path / "plain", []))
    assert torch.equal(plain, trained(kto(tmp_path / "again", [])))
    for entry in PARAM_SPACE + MODEL_LEVEL:
        assert not torch.equal(plain, trained(kto(tmp_path / entry["name"], [entry]))), entry["name"]
    with pytest.raises(TetherError, match="kl cannot apply beside KTOTrainer's loss.*use its beta"):
        kto(tmp_path / "kl", [{"name": "kl"}])


def test_reward_regularizers_change_the_weights_or_are_refused(tmp_path: Path) -> None:
    """A reward model scores whole rows: no token loss for ewc's Fisher, si's importance or finish()'s forgetting on
    the reference rows (each refused in one line, where ewc's had died in an IndexError); the parameter-space,
    optimizer-level and model-level ones change the weights, and ema's model is measured on the eval data."""
    plain = trained(reward(tmp_path / "plain", []))
    assert torch.equal(plain, trained(reward(tmp_path / "again", [])))
    for entry in [e for e in PARAM_SPACE if e["name"] not in ("ewc", "si")] + MODEL_LEVEL:
        assert not torch.equal(plain, trained(reward(tmp_path / entry["name"], [entry]))), entry["name"]
    for name in ("ewc", "si"):
        with pytest.raises(TetherError, match=f"{name} reads the reference rows by their token loss.*use l2_sp") as e:
            reward(tmp_path / name, [{"name": name}], reference=FACTS)
        assert "\n" not in str(e.value)
    with pytest.raises(TetherError, match="kl cannot apply beside RewardTrainer's loss.*or l2_sp, l1, l2,") as e:
        reward(tmp_path / "kl", [{"name": "kl"}])
    assert "ewc" not in str(e.value)  # it had recommended ewc and si, which cannot run here
    with pytest.raises(TetherError, match="finish\\(\\) measures forgetting .*leave reference and measure out"):
        reward(tmp_path / "measured", [{"name": "ema"}], reference=FACTS)
    trainer = reward(tmp_path / "ema", [{"name": "ema", "decay": 0.5}])
    trainer.train()
    assert "val_loss" in tether.finish(trainer)["ema"]["target"]


def test_a_users_sft_subclass_delegating_to_trls_loss_is_refused_beside_kl(tmp_path: Path) -> None:
    """TRL's SFTTrainer.compute_loss returns the logits of a second forward without gradient: kl on them would add
    nothing (it had trained silently without it); refused in one line at the first step."""

    class MySFT(SFTTrainer):
        def compute_loss(self, *args: Any, **kwargs: Any) -> Any:
            return super().compute_loss(*args, **kwargs)

    config = SFTConfig(output_dir=str(tmp_path), max_length=32, **(COMMON | {"max_steps": 1}))
    trainer = MySFT(model=model(), args=config, train_dataset=Dataset.from_list(SFT_DATA["prompt_completion"]),
                    processing_class=TOKENIZER)  # fmt: skip
    trainer = tether.regularize(trainer, [{"name": "kl"}], reference=FACTS)
    with pytest.raises(TetherError, match="MySFT.compute_loss returned outputs without logits in the graph: kl"):
        trainer.train()
