"""The Python API: tether.regularize on a stock transformers.Trainer, what it refuses instead of doing nothing, resume
through train(resume_from_checkpoint=...), knowledge/forgetting, the model card, the examples and the README's
Python API section (run as written)."""

from __future__ import annotations

import re
import runpy
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

import tether
from tether.config import RegularizerEntry
from tether.errors import TetherError
from tether.regularizers import RegularizerStack, parse_entries
from tether.synthetic import char_tokenizer, tiny_model
from tether.trainer import RegularizedMixin, StepEnd

ROOT = Path(__file__).parent.parent
TOKENIZER = char_tokenizer()
FACTS = [{"prompt": f"The color of item {i} is", "completion": f" c{i % 5}."} for i in range(8)]
ARGS = dict(max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True,
            logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0)  # fmt: skip


def rows() -> Dataset:
    """Tokenized addition rows without labels: the collator makes them (every token carries loss)."""
    encoded = [TOKENIZER(f"{a}+1={a + 1}") for a in range(16)]
    return Dataset.from_list([{"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]} for e in encoded])


def trainer(out: Path, model: Any = None, optimizers: Any = (None, None), **args: Any) -> Trainer:
    model = model if model is not None else tiny_model("llama", "causal_lm", len(TOKENIZER), hidden_size=32)
    return Trainer(model=model, args=TrainingArguments(str(out), **(ARGS | args)), train_dataset=rows(),
                   data_collator=DataCollatorForLanguageModeling(TOKENIZER, mlm=False), processing_class=TOKENIZER,
                   optimizers=optimizers)  # fmt: skip


def weights(trainer: Trainer) -> torch.Tensor:
    trainer.train()
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters() if p.requires_grad])


def test_regularize_a_stock_trainer_with_dataset_reference(tmp_path: Path) -> None:
    """l2_sp + ewc + kl + replay from a datasets.Dataset reference; strength 0 against > 0 changes the weights."""
    runs = []
    for strength in (0.0, 1.0):
        regs = [{"name": "l2_sp", "strength": strength}, {"name": "ewc", "strength": strength},
                {"name": "kl", "strength": strength}, {"name": "replay", "ratio": 0.2}]  # fmt: skip
        t = tether.regularize(trainer(tmp_path / str(strength)), regs, reference=Dataset.from_list(FACTS))
        assert len(t.train_dataset) == 16 + 4
        runs.append(weights(t))
    assert not torch.equal(*runs)


def test_entries_as_config_objects_and_bad_entries(tmp_path: Path) -> None:
    from tether.regularizers.l2_sp import L2SPConfig

    t = tether.regularize(trainer(tmp_path / "a"), [{"name": "l2"}, L2SPConfig(name="l2_sp", strength=0.1)])
    assert t.stack.names == ["l2", "l2_sp"] and t.stack.items[1][1] == 0.1
    with pytest.raises(TetherError, match=r"regularizers\[0\]: unknown regularizer 'l3'"):
        tether.regularize(trainer(tmp_path / "b"), [{"name": "l3"}])
    with pytest.raises(TetherError, match="ewc need reference data: pass reference="):
        tether.regularize(trainer(tmp_path / "c"), [{"name": "ewc"}])
    with pytest.raises(TetherError, match="regularized already"):
        tether.regularize(t, [])


def test_replay_into_rows_without_labels(tmp_path: Path) -> None:
    """Training rows without labels (the collator makes them), counted by tokens: no KeyError, rows of the
    training set's columns added, and training runs on the mix."""
    t = tether.regularize(trainer(tmp_path), [{"name": "replay", "by": "tokens"}], reference=FACTS)
    assert t.train_dataset.column_names == ["input_ids", "attention_mask"] and len(t.train_dataset) > 16
    t.train()


def test_a_stack_never_set_up_is_refused(tmp_path: Path) -> None:
    class T(RegularizedMixin, Trainer):
        pass

    t = trainer(tmp_path)
    t.__class__ = T
    t.stack = RegularizerStack.from_configs(
        parse_entries([RegularizerEntry(name="l2_sp", strength=1.0)])
    )  # no setup()
    t.add_callback(StepEnd(t.stack))
    with pytest.raises(TetherError, match="never set up"):
        t.train()


def test_a_user_optimizer_gets_the_pulls_and_refuses_group_regularizers(tmp_path: Path) -> None:
    runs = []
    for strength in (0.0, 10.0):
        model = tiny_model("llama", "causal_lm", len(TOKENIZER), hidden_size=32)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        t = tether.regularize(trainer(tmp_path, model, optimizers=(optimizer, None)),
                              [{"name": "l2_sp", "strength": strength}])  # fmt: skip
        runs.append(weights(t))
    assert not torch.equal(*runs)
    model = tiny_model("llama", "causal_lm", len(TOKENIZER), hidden_size=32)
    t = trainer(tmp_path, model, optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    t = trainer(tmp_path, model, optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None), weight_decay=0.5)
    assert tether.regularize(t, []).stack.names == []  # a user optimizer never read args.weight_decay
    t = trainer(tmp_path, model, optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    with pytest.raises(TetherError, match="weight_decay set the optimizer's parameter groups"):
        tether.regularize(t, [{"name": "weight_decay", "strength": 0.1}]).train()


def test_training_arguments_weight_decay_becomes_the_regularizer(tmp_path: Path) -> None:
    """TrainingArguments.weight_decay is the weight_decay regularizer (the same weights as naming it); two different
    values, or the mixin without tether.regularize, are refused rather than one of them dropped."""
    merged = tether.regularize(trainer(tmp_path / "a", weight_decay=5.0), [])
    assert merged.stack.names == ["weight_decay"]
    named = tether.regularize(trainer(tmp_path / "b"), [{"name": "weight_decay", "strength": 5.0}])
    assert torch.equal(weights(merged), weights(named))
    with pytest.raises(TetherError, match="differ"):
        tether.regularize(trainer(tmp_path / "c", weight_decay=0.5), [{"name": "weight_decay", "strength": 0.1}])
    t = tether.regularize(trainer(tmp_path / "d"), [{"name": "l2", "strength": 0.1}])
    t.args.weight_decay = 0.5  # as a script that sets the mixin up by hand would leave it
    with pytest.raises(TetherError, match="TrainingArguments.weight_decay=0.5"):
        t.train()


def test_adapters_added_after_setup_are_refused(tmp_path: Path) -> None:
    t = tether.regularize(trainer(tmp_path), [{"name": "l2_sp", "strength": 1.0}])
    t.model = get_peft_model(t.model, LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(TetherError, match="trainable parameters changed after the regularizers were set up"):
        t.train()


def test_resume_through_train_keeps_the_ema(tmp_path: Path) -> None:
    regs = [{"name": "ema", "decay": 0.5}]
    whole = tether.regularize(trainer(tmp_path / "w", max_steps=4, save_strategy="steps", save_steps=2), regs)
    whole.train()
    resumed = tether.regularize(trainer(tmp_path / "r", max_steps=4), regs)
    resumed.train(resume_from_checkpoint=str(tmp_path / "w" / "checkpoint-2"))
    a, b = whole.stack.items[0][0], resumed.stack.items[0][0]
    assert a.steps == b.steps == 4
    for x, y in zip(a.shadow, b.shadow):
        torch.testing.assert_close(x, y)


def test_forgetting_in_one_call(tmp_path: Path) -> None:
    model = tiny_model("llama", "causal_lm", len(TOKENIZER), hidden_size=32)
    before = tether.knowledge(model, TOKENIZER, FACTS)
    assert set(before) == {"loss", "recall"}
    with pytest.raises(TetherError, match="needs before="):
        tether.forgetting(model, TOKENIZER, FACTS)
    weights(trainer(tmp_path, model))
    out = tether.forgetting(model, TOKENIZER, FACTS, before)
    assert out["reference_loss_before"] == before["loss"] and out["delta_loss"] != 0
    original = tiny_model("llama", "causal_lm", len(TOKENIZER), hidden_size=32)  # the same seed: the model before
    assert tether.forgetting(model, TOKENIZER, FACTS, original) == out
    lora = get_peft_model(tiny_model("llama", "causal_lm", len(TOKENIZER), hidden_size=32),
                          LoraConfig(r=4, target_modules=["q_proj"]))  # fmt: skip
    assert tether.forgetting(lora, TOKENIZER, FACTS)["delta_loss"] == 0  # a fresh adapter: against itself off


def test_model_card_of_a_run(raw_config: dict[str, Any], tmp_path: Path) -> None:
    from tether.config import RunConfig
    from tether.run import train

    cfg = RunConfig.model_validate(raw_config | {"lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}})
    metrics = train(cfg, tmp_path / "run")
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "base_model: synthetic llama" in card and "library_name: peft" in card
    assert "| weight_decay | 0.01 |" in card and "| l2 | 0.0001 |" in card
    assert f"{metrics['target']['val_loss']:.4f}" in card and "reference loss before -> after" in card
    full = tether.model_card("org/base", parse_entries([RegularizerEntry(name="l2_sp", strength=0.1)]), {})
    assert "library_name: transformers" in full and "| l2_sp | 0.1 |" in full and "Not measured." in full


@pytest.mark.parametrize("script", ["trainer_regularized.py", "sft_regularized.py"])
def test_examples_run(script: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    """The example scripts, as written, for a few steps (their early stopping and checkpoints included)."""
    pytest.importorskip("trl")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EXAMPLE_STEPS", "4")
    runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
    assert "forgetting: {'reference_loss_before'" in capsys.readouterr().out
    added = [line for line in (ROOT / "examples" / script).read_text().splitlines() if line.endswith("# added")]
    assert len(added) <= 10


def test_readme_python_api_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every python block of the README's Python API section, in order, in one namespace."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EXAMPLE_STEPS", "4")
    namespace: dict[str, Any] = {}
    for block in blocks:
        exec(compile(block, "README.md: Python API", "exec"), namespace)


def test_public_api_and_py_typed() -> None:
    for name in tether.__all__:
        assert getattr(tether, name) is not None
    assert (ROOT / "src" / "tether" / "py.typed").is_file()
    assert '[tool.setuptools.package-data]\ntether = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()


def test_self_replay_and_flow_through_regularize(tmp_path: Path) -> None:
    """self_replay generates with the trainer's model (train_data gets it); flow refuses rows without labels in one
    line rather than failing inside its setup pass."""
    t = tether.regularize(
        trainer(tmp_path / "a"),
        [{"name": "self_replay", "ratio": 0.25, "max_new_tokens": 4, "max_perplexity": 1e9}],
        reference=FACTS,
    )
    assert len(t.train_dataset) > 16  # generated rows mixed in
    t.train()
    with pytest.raises(TetherError, match="flow weighs each training row by its labelled tokens"):
        tether.regularize(trainer(tmp_path / "b"), [{"name": "flow"}])


def ids(rows: Any) -> set[tuple[int, ...]]:
    return {tuple(row["input_ids"]) for row in rows}


def measured_and_replayed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, regs: list[dict[str, Any]],
                          **given: Any) -> tuple[set, set, dict[str, Any]]:  # fmt: skip
    """Train a regularized tiny trainer and run finish(): the rows finish() measured forgetting on (as passed to
    reference_metrics), the reference rows replay mixed into the training rows (after the 16 of rows()), finish()'s
    results."""
    seen: list[Any] = []

    def measured(model: Any, tokenizer: Any, split: Any, collate: Any) -> dict[str, float]:
        seen.append(split.encoded)
        return {"loss": 1.0}

    monkeypatch.setattr(tether.api, "reference_metrics", measured)
    t = tether.regularize(trainer(tmp_path, eval_strategy="no"), regs, **given)
    replayed = ids(t.train_dataset.to_list()[16:])
    t.eval_dataset = rows()
    t.train()
    results = tether.finish(t)
    assert len(seen) > 1 and all(ids(r) == ids(seen[0]) for r in seen)  # before, and each candidate after
    return ids(seen[0]), replayed, results


WISE_FT = {"name": "wise_ft", "alphas": [0.0, 1.0]}
REPLAY_ALL = {"name": "replay", "ratio": 0.34}  # 8 of 24 rows: every row of a source of up to 8, once


def test_replay_and_wise_ft_split_the_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """finish() measures wise_ft's models on reference rows replay never trained on: the two halves are disjoint
    and together the reference, the same ones for the same seed, and finish() says so."""
    everything = ids(tether.api.encode_rows(FACTS, TOKENIZER, 64))
    measured, replayed, results = measured_and_replayed(tmp_path / "a", monkeypatch, [REPLAY_ALL, WISE_FT],
                                                        reference=FACTS)  # fmt: skip
    assert measured and replayed and not measured & replayed and measured | replayed == everything
    assert measured_and_replayed(tmp_path / "b", monkeypatch, [REPLAY_ALL, WISE_FT], reference=FACTS)[0] == measured
    assert results["reference_roles"] == {
        "measured_rows": 4, "measured_examples": 4, "held_out_rows": 4, "held_out_examples": 4, "holdout_share": 0.5,
        "split_seed": 0, "measured_examples_read": 0, "readers": {"replay": "the held-out rows of reference (4 rows)"},
        "trained_on_measured": False,
    }  # fmt: skip


def test_a_rows_windows_stay_on_one_side_of_the_split(tmp_path: Path) -> None:
    long = [{"text": c * 20} for c in "abcdefgh"]  # 21 tokens with EOS: windows of 8, 8, 5, none shared by two rows
    t = tether.regularize(trainer(tmp_path), [REPLAY_ALL, WISE_FT], reference=long, max_length=8)
    measured = ids(t.reference_measured.encoded)
    windows = [ids(tether.api.encode_rows([row], TOKENIZER, 8)) for row in long]
    assert all(len(w) > 1 and (w <= measured or not w & measured) for w in windows)
    assert sum(w <= measured for w in windows) == 4
    assert t.reference_roles["measured_examples"] == len(t.reference_measured.encoded) == 12
    assert t.reference_roles["measured_rows"] == t.reference_roles["held_out_rows"] == 4  # rows, not windows


def test_ewc_and_ema_split_the_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ewc's Fisher is estimated on the rows ema's model is not measured on."""
    read: list[Any] = []
    batches_of = tether.api.batches_of
    monkeypatch.setattr(tether.api, "batches_of", lambda rows, *a: read.append(rows) or batches_of(rows, *a))
    measured, _, results = measured_and_replayed(tmp_path, monkeypatch, [{"name": "ewc"}, {"name": "ema"}],
                                                 reference=FACTS)  # fmt: skip
    assert len(read) == 1 and len(measured) == len(read[0]) == 4 and not measured & ids(read[0])
    assert results["reference_roles"]["readers"] == {"ewc": "the held-out rows of reference (4 rows)"}


def test_measure_given_the_regularizers_read_every_reference_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = [{"prompt": f"The size of item {i} is", "completion": f" s{i}."} for i in range(3)]
    measured, replayed, results = measured_and_replayed(tmp_path / "a", monkeypatch, [REPLAY_ALL, WISE_FT],
                                                        reference=FACTS, measure=other)  # fmt: skip
    assert replayed == ids(tether.api.encode_rows(FACTS, TOKENIZER, 64))
    assert measured == ids(tether.api.encode_rows(other, TOKENIZER, 64))
    roles = results["reference_roles"]
    assert roles["held_out_rows"] == 0 and roles["holdout_share"] is None and not roles["trained_on_measured"]
    assert roles["readers"] == {"replay": "every row of reference (8 rows)"}
    again = measured_and_replayed(tmp_path / "b", monkeypatch, [REPLAY_ALL, WISE_FT], reference=FACTS, measure=FACTS)
    assert again[0] == again[1] and again[2]["reference_roles"]["trained_on_measured"]  # asked for: and said so
    alone = tether.regularize(trainer(tmp_path / "c"), [WISE_FT], measure=other)  # no reference: measure= only
    assert ids(alone.reference_measured.encoded) == measured and alone.reference_before is not None


@pytest.mark.parametrize("regs", [[REPLAY_ALL], [WISE_FT]], ids=["replay", "wise_ft"])
def test_readers_or_measurers_alone_use_every_reference_row(regs: list[dict[str, Any]], tmp_path: Path) -> None:
    t = tether.regularize(trainer(tmp_path), regs, reference=FACTS)
    everything = ids(tether.api.encode_rows(FACTS, TOKENIZER, 64))
    assert ids(t.reference_measured.encoded) == everything
    if regs == [REPLAY_ALL]:
        assert ids(t.train_dataset.select(range(16, 24))) == everything and t.reference_before is None
    else:
        assert len(t.train_dataset) == 16 and t.reference_before is not None


def test_what_cannot_be_split_or_measured_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TetherError, match="fewer than 2 rows: .* pass measure="):
        tether.regularize(trainer(tmp_path / "a"), [REPLAY_ALL, WISE_FT], reference=FACTS[:1])
    with pytest.raises(TetherError, match="measure= is what finish\\(\\) measures"):
        tether.regularize(trainer(tmp_path / "b"), [REPLAY_ALL], reference=FACTS, measure=FACTS)


def test_finish_measures_the_recall_of_a_fact_set(tmp_path: Path) -> None:
    """prompt/completion reference rows are a fact set: finish() measures their recall beside the loss, as
    tether.knowledge and `tether train` do (it had measured the loss only)."""
    t = tether.regularize(trainer(tmp_path, eval_strategy="no"), [WISE_FT], reference=FACTS)
    t.eval_dataset = rows()
    t.train()
    rows_measured = tether.finish(t)["wise_ft"]["alphas"]
    before = tether.knowledge(t.model, TOKENIZER, FACTS)  # the trained model: wise_ft restored alpha 1
    assert all("recall" in row for row in rows_measured)
    assert rows_measured[-1]["recall"] == before["recall"]


def test_reference_rows_are_checked_as_tether_train_checks_its_files(tmp_path: Path) -> None:
    blank = {"prompt": "x", "completion": " "}
    with pytest.raises(TetherError, match=r"reference row \{'prompt': 'x', 'completion': ' '\}: the completion is"):
        tether.regularize(trainer(tmp_path), [REPLAY_ALL], reference=[FACTS[0], blank])


class ZeroLoss(Trainer):
    """A user's own loss that trains nothing, counting its calls: tether calls it, or refuses."""

    calls = 0

    def compute_loss(
        self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        ZeroLoss.calls += 1  # on the class itself: tether.regularize subclasses it
        outputs = model(**inputs)
        return (0.0 * outputs.loss, outputs) if return_outputs else 0.0 * outputs.loss


class LossOnly(Trainer):
    """A user's own loss that ignores return_outputs (a common override)."""

    def compute_loss(
        self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        return model(**inputs).loss


class SecondForward(Trainer):
    """A user's own loss that returns the outputs of a forward without gradient."""

    def compute_loss(
        self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        loss = model(**inputs).loss
        with torch.no_grad():
            outputs = model(**inputs)
        return (loss, outputs) if return_outputs else loss


def of_class(cls: type, out: Path) -> Trainer:
    t = trainer(out)
    t.__class__ = cls  # the user's subclass of Trainer, built as the user builds it
    return t


@pytest.mark.parametrize("name", ["dft", "eaft", "flow", "asft"])
def test_loss_shaping_beside_a_users_compute_loss_is_refused(tmp_path: Path, name: str) -> None:
    """The shaped loss is tether's own cross-entropy: a user's compute_loss would never run (a ZeroLoss trainer with
    dft trained on the cross-entropy)."""
    with pytest.raises(TetherError, match=f"{name} weights .*ZeroLoss.compute_loss would never run: drop {name}") as e:
        tether.regularize(of_class(ZeroLoss, tmp_path), [{"name": name}], reference=FACTS)
    assert "\n" not in str(e.value)


def test_a_users_compute_loss_is_what_the_penalties_add_to(tmp_path: Path) -> None:
    """kl beside a user's compute_loss: the user's loss runs every step (with return_outputs=True: kl reads its
    outputs); one that returns no outputs, or outputs without gradient, is refused in one line."""
    ZeroLoss.calls = 0
    t = tether.regularize(of_class(ZeroLoss, tmp_path / "zero"), [{"name": "kl", "strength": 1.0}])
    t.train()
    assert ZeroLoss.calls == 3
    refusals = {LossOnly: r"returned a tensor where return_outputs=True asks for \(loss, outputs\): kl reads the",
                SecondForward: "returned outputs without logits in the graph: kl reads them"}  # fmt: skip
    for cls, message in refusals.items():
        t = tether.regularize(of_class(cls, tmp_path / cls.__name__), [{"name": "kl", "strength": 1.0}])
        with pytest.raises(TetherError, match=f"{cls.__name__}.compute_loss {message}") as e:
            t.train()
        assert "\n" not in str(e.value)


def test_a_hand_mixed_trainer_is_told_what_to_set_up(tmp_path: Path) -> None:
    """RegularizedMixin mixed in by hand: each missing piece (stack, setup, StepEnd) is one line naming all three,
    and tether.regularize says to build the trainer without the mixin instead of 'regularized already'; set up as
    told, it trains with the regularizer in the step."""

    class MyT(RegularizedMixin, Trainer):
        pass

    t = of_class(MyT, tmp_path / "mixed")
    what_to_do = r"trainer.stack = .*trainer.stack.setup\(SetupContext.*add_callback\(StepEnd\(trainer.stack\)\)"
    with pytest.raises(TetherError, match=f"MyT has no regularizer stack: .*{what_to_do}") as e:
        t.train()
    assert "\n" not in str(e.value)
    with pytest.raises(TetherError, match="MyT mixes in RegularizedMixin.*build a Trainer without the mixin"):
        tether.regularize(t, [{"name": "l2_sp", "strength": 1.0}])
    t.stack = RegularizerStack.from_configs(parse_entries([RegularizerEntry(name="l2_sp", strength=1.0)]))
    with pytest.raises(TetherError, match=f"MyT has a regularizer stack that was never set up: .*{what_to_do}"):
        t.train()
    from tether.regularizers import SetupContext

    t.stack.setup(SetupContext(t.model, None, t.args.learning_rate))
    with pytest.raises(TetherError, match=r"MyT has no StepEnd\(trainer.stack\) callback"):
        t.train()
    t.add_callback(StepEnd(t.stack))
    assert not torch.equal(weights(t), weights(trainer(tmp_path / "plain")))


def test_a_run_in_the_working_directory_saves_its_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """output_dir "." has no name of its own: the staging folder is named after the resolved directory (the first
    save died removing "." itself)."""
    monkeypatch.chdir(tmp_path)
    t = tether.regularize(trainer(Path("."), save_strategy="steps", save_steps=2), [{"name": "l2_sp", "strength": 1}])
    t.train()
    saved = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint"))
    assert saved == ["checkpoint-2", "checkpoint-3"]
    assert not (tmp_path / ".staging").exists()
