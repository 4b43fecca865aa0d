"""The frozen reference and the regularizers around it (distill, kl, replay, label_smoothing, dropout, neftune, ema,
wise_ft): parity with naive references, behaviour, and one run end to end."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tether.config import RegularizerEntry, validate_config
from tether.data import IGNORE, Collator
from tether.errors import ConfigError
from tether.reference import Reference, ReferenceOptions, TeacherLogits, at_positions, loss_positions, row_keys
from tether.regularizers import REGISTRY, FinishContext, RegularizerStack, SetupContext, parse_entries
from tether.regularizers.distill import divergence
from tether.regularizers.dropout import knobs
from tether.regularizers.ema import EMA
from tether.regularizers.label_smoothing import uniform_minus_nll
from tether.regularizers.neftune import noise_like
from tether.regularizers.replay import loss_tokens, mix
from tether.run import train
from tether.step import train_step
from tether.synthetic import ARCHITECTURES, ENCODER_ONLY, tiny_model

VOCAB = 40


def model_of(arch: str = "llama", task: str = "causal_lm", seed: int = 0) -> nn.Module:
    return tiny_model(arch, task, VOCAB, hidden_size=16, num_layers=2, num_heads=2, seed=seed)


def batch_of(n: int = 4, seed: int = 0, task: str = "causal_lm") -> dict[str, torch.Tensor]:
    """Rows of different lengths (so the batch is padded), the first 3 positions of each a prompt without loss."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ids = [rng.randrange(4, VOCAB) for _ in range(rng.randint(5, 10))]
        labels = rng.randrange(2) if task != "causal_lm" else [IGNORE] * 3 + ids[3:]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return Collator(0)(rows)


def stack_of(model: nn.Module, *entries: dict[str, Any], lr: float = 1e-2) -> RegularizerStack:
    stack = RegularizerStack.from_configs([REGISTRY[e["name"]].config(**e) for e in entries])
    stack.setup(SetupContext(model, None, lr))
    return stack


def lora(model: nn.Module, trained: bool = False) -> nn.Module:
    """A PEFT LoRA model; `trained`: its adapter is away from init, as one trained before this run is."""
    from peft import LoraConfig, TaskType, get_peft_model

    task = TaskType.CAUSAL_LM if model.get_output_embeddings() is not None else TaskType.SEQ_CLS
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type=task))
    if trained:
        move_adapter(peft, seed=1)
    return peft


def move_adapter(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.train(was)
    return out


def at_loss(values: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """values at the batch's loss positions, as Reference.logits gives them."""
    return at_positions(values, *loss_positions(batch["labels"]))


def storages(*modules: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for m in modules for t in [*m.parameters(), *m.buffers()]}


def sgd_steps(model: nn.Module, stack: RegularizerStack, batches: list[dict], lr: float = 1e-2) -> None:
    """tether.step.train_step per batch (the trainer's step) with plain SGD over the stack's groups."""
    opt = torch.optim.SGD(stack.optimizer_groups(model, lr), lr=lr)
    stack.attach(model, opt)
    model.train()
    for batch in batches:
        train_step(model, batch, opt, stack)


# ---------------------------------------------------------------------------------------------------------------
# The reference


def test_lora_reference_disables_the_adapter_and_copies_no_weight():
    base = model_of()
    batch = batch_of()
    original = logits(base, batch)
    model = lora(base)
    before = storages(model)
    ref = Reference.build(model, ReferenceOptions())
    assert ref.mode == "disable" and ref.frozen is None and ref.adapter is None
    assert storages(model) == before  # nothing copied, nothing new in the model
    move_adapter(model, seed=2)  # training moves the adapter
    assert not torch.allclose(logits(model, batch), original, atol=1e-4)
    torch.testing.assert_close(ref.logits(batch)[:], at_loss(original, batch))
    assert model.training and all(m.training for m in model.modules())  # each module's mode put back


def test_an_adapter_trained_before_the_run_gets_a_cloned_frozen_reference():
    model = lora(model_of(), trained=True)
    batch = batch_of()
    at_setup = logits(model, batch)
    with model.disable_adapter():
        base = logits(model, batch)
    ref = Reference.build(model, ReferenceOptions())
    assert ref.mode == "clone"
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(ref.adapter) == set(trainable)  # a clone of the adapter, not of the model
    assert all(not t.requires_grad for t in ref.adapter.values())
    assert storages(model).isdisjoint(t.untyped_storage().data_ptr() for t in ref.adapter.values())
    move_adapter(model, seed=3)
    got = ref.logits(batch)[:]
    torch.testing.assert_close(got, at_loss(at_setup, batch))
    assert not torch.allclose(got, at_loss(base, batch), atol=1e-3), (
        "disabling the adapter would have been the wrong reference"
    )
    assert all(p.requires_grad for p in trainable.values())
    assert Reference.build(model, ReferenceOptions(adapter="disable")).mode == "disable"  # forced by config


def test_full_fine_tuning_reference_is_a_frozen_copy_optionally_in_bf16():
    model = model_of()
    batch = batch_of()
    original = logits(model, batch)
    ref = Reference.build(model, ReferenceOptions())
    half = Reference.build(model, ReferenceOptions(dtype="bfloat16", offload=True))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    torch.testing.assert_close(ref.logits(batch)[:], at_loss(original, batch))
    assert all(not p.requires_grad for p in ref.frozen.parameters()) and not ref.frozen.training
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in half.frozen.parameters())
    torch.testing.assert_close(half.logits(batch)[:].float(), at_loss(original, batch), atol=0.05, rtol=0.05)


def rows_of(n: int, seed: int, task: str) -> list[dict]:
    """Rows of lengths 5..5+n-1 in shuffled order, a 3-token prompt without loss on each (causal LM)."""
    rng = random.Random(seed)
    lengths = rng.sample(range(5, 5 + n), n)
    rows = []
    for length in lengths:
        ids = [rng.randrange(4, VOCAB) for _ in range(length)]
        labels = rng.randrange(2) if task != "causal_lm" else [IGNORE] * 3 + ids[3:]
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": labels})
    return rows


def one_by_one(model: nn.Module, rows: list[dict]) -> list[torch.Tensor]:
    """Each row's logits at its loss positions, from the model run on that row alone (no padding)."""
    return [at_loss(logits(model, batch), batch) for batch in (Collator(0)([row]) for row in rows)]


@pytest.mark.parametrize(
    "arch,task,kind",
    [("llama", "causal_lm", "lora"), ("qwen2", "causal_lm", "trained_lora"), ("gpt2", "causal_lm", "copy"),
     ("gpt_neox", "causal_lm", "offload"), ("bert", "sequence_classification", "copy"),
     ("llama", "sequence_classification", "lora")],
)  # fmt: skip
def test_the_row_cache_and_the_split_output_layer_give_the_original_logits(arch: str, task: str, kind: str):
    """Parity with the original model run row by row, for rows first met in one batch and met again in others
    (another order, another padding width); only rows not met before run through the model."""
    base = model_of(arch, task)
    model = lora(base, trained=kind == "trained_lora") if "lora" in kind else base
    rows = rows_of(6, seed=1, task=task)
    expected = one_by_one(model, rows)
    ref = Reference.build(model, ReferenceOptions(offload=kind == "offload"))
    assert ref.split == (task == "causal_lm")  # a classification head pools: the whole model runs
    body = (ref.frozen if ref.mode == "copy" else model.get_base_model() if "lora" in kind else model).base_model
    ran = []
    body.register_forward_pre_hook(lambda m, a, kw: ran.append(len(a[0] if a else kw["input_ids"])), with_kwargs=True)
    if "lora" in kind:
        move_adapter(model, seed=5)  # training moves the adapter...
    else:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05)  # ...or the weights
    for order in ([0, 1, 2, 3], [5, 2, 4, 0], [3, 1, 0, 5]):
        got = ref.logits(Collator(0)([rows[i] for i in order]))[:]
        torch.testing.assert_close(got, torch.cat([expected[i] for i in order]), rtol=1e-4, atol=1e-5)
    assert ran == [4, 2]  # rows 0-3, then 5 and 4; the third batch came from the cache


def test_soft_capped_logits_come_from_the_whole_model():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    sizes = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "head_dim": 8}
    heads = {"num_attention_heads": 2, "num_key_value_heads": 1}
    config = Gemma2Config(vocab_size=VOCAB, **sizes, **heads, final_logit_softcapping=30.0)
    model = Gemma2ForCausalLM(config)
    rows = rows_of(3, seed=4, task="causal_lm")
    ref = Reference.build(model, ReferenceOptions())
    assert not ref.split  # the output embeddings alone would leave the capping out
    got = ref.logits(Collator(0)(rows))[:]
    torch.testing.assert_close(got, torch.cat(one_by_one(model, rows)), rtol=1e-4, atol=1e-5)


def test_without_room_in_the_row_cache_rows_run_every_time():
    model = lora(model_of())
    batch = Collator(0)(rows_of(4, seed=2, task="causal_lm"))
    expected = Reference.build(model, ReferenceOptions(cache_mb=0)).logits(batch)[:]
    off = Reference.build(model, ReferenceOptions(cache_mb=0))
    for _ in range(3):
        torch.testing.assert_close(off.logits({**batch})[:], expected)
        off.clear()
    assert off.forwards == 3 and not off.cache.rows
    room = Reference.build(model, ReferenceOptions())
    room.logits(batch)
    sizes = [t.numel() * t.element_size() for t in room.cache.rows.values()]
    two = Reference.build(model, ReferenceOptions())
    two.cache = type(two.cache)(sizes[0] + sizes[1])  # room for the first two rows only
    two.logits(batch)
    two.clear()
    torch.testing.assert_close(two.logits({**batch})[:], expected)
    assert two.forwards == 2 and len(two.cache.rows) == 2


def test_row_keys_see_content_and_labels_not_trailing_padding():
    rows = rows_of(3, seed=3, task="causal_lm")
    keys = row_keys(Collator(0)(rows))
    assert len(set(keys)) == 3
    wider = row_keys(Collator(0)([*rows, {"input_ids": [5] * 20, "attention_mask": [1] * 20, "labels": [5] * 20}]))
    assert wider[:3] == keys  # padded to 20 tokens instead of the longest row's
    relabelled = [{**rows[0], "labels": [IGNORE] * 4 + rows[0]["input_ids"][4:]}, *rows[1:]]
    assert row_keys(Collator(0)(relabelled))[0] != keys[0]  # other loss positions: another entry
    assert row_keys({**Collator(0)(rows), "extra": 1}) == [None] * 3  # not all per row: no caching
    batch = Collator(0)(rows)
    assert row_keys({**batch, "attention_mask": batch["attention_mask"][:, None, None]}) == [None] * 3  # 4-D mask
    # labels with loss past the last real token (pad tokens left in the labels) are part of the row
    padded = {k: v.clone() for k, v in batch.items()}
    padded["labels"][0, -1] = 5
    assert len(rows[0]["input_ids"]) < batch["input_ids"].shape[1] and row_keys(padded)[0] != keys[0]


def test_the_row_cache_counts_a_row_once():
    model = lora(model_of())
    row = rows_of(1, seed=6, task="causal_lm")[0]
    ref = Reference.build(model, ReferenceOptions())
    ref.logits(Collator(0)([row, row]))
    (held,) = ref.cache.rows.values()
    assert ref.cache.used == held.numel() * held.element_size()


def test_reference_options_are_checked_where_used():
    with pytest.raises(ConfigError, match="different `reference:` options"):
        stack_of(model_of(), {"name": "distill", "reference": {"dtype": "bfloat16"}},
                 {"name": "kl", "reference": {"dtype": "float16"}})  # fmt: skip
    # the same options on one of them only are fine
    stack = stack_of(model_of(), {"name": "distill", "reference": {"dtype": "bfloat16"}}, {"name": "kl"})
    assert next(stack.reference.frozen.parameters()).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="under LoRA the reference is the same model"):
        stack_of(lora(model_of()), {"name": "kl", "reference": {"offload": True}})
    with pytest.raises(ConfigError, match="LoRA only"):
        stack_of(model_of(), {"name": "kl", "reference": {"adapter": "clone"}})


@pytest.mark.parametrize("cache_mb", [0, 1])
def test_trainer_runs_the_reference_before_the_student_once_per_new_micro_batch(tmp_path: Path, cache_mb: int):
    """RegularizedTrainer prefetches the teacher's logits before the student's forward (the student's activations are
    not alive during it) and distill + kl then read them: one reference forward per micro-batch, none repeated; with
    the row cache, none at all in the second epoch (3 steps x 2 micro-batches x 2 rows = 1.5 epochs of 8 rows)."""
    from transformers import TrainingArguments

    from tether.trainer import RegularizedTrainer

    model = lora(model_of())
    rng = random.Random(0)
    ids = [[rng.randrange(4, VOCAB) for _ in range(rng.randint(5, 10))] for _ in range(8)]
    rows = [{"input_ids": i, "attention_mask": [1] * len(i), "labels": [IGNORE] * 3 + i[3:]} for i in ids]
    options = {"reference": {"cache_mb": cache_mb}}
    stack = RegularizerStack.from_configs([REGISTRY[n].config(name=n, **options) for n in ("distill", "kl")])
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=3, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, save_strategy="no", disable_tqdm=True, dataloader_pin_memory=False,
    )  # fmt: skip
    trainer = RegularizedTrainer(model=model, args=args, train_dataset=rows, data_collator=Collator(0), stack=stack)
    stack.setup(SetupContext(trainer.model, None, args.learning_rate))
    order = []
    body = model.get_base_model().base_model  # what both forwards run (the reference's output layer runs apart)
    body.register_forward_pre_hook(lambda m, a: order.append("student" if torch.is_grad_enabled() else "reference"))
    trainer.train()
    new_batches = 6 if cache_mb == 0 else 4  # the cache holds every row after the first epoch's 4 micro-batches
    assert stack.reference.forwards == new_batches
    assert order == ["reference", "student"] * new_batches + ["student"] * (6 - new_batches)


@pytest.mark.parametrize("use_lora", [False, True], ids=["full_copy", "lora"])
def test_distill_and_kl_share_one_reference_forward_per_step(use_lora: bool):
    model = lora(model_of()) if use_lora else model_of()
    stack = stack_of(model, {"name": "distill"}, {"name": "kl"})
    reference_net = model.get_base_model().base_model if use_lora else stack.reference.frozen.base_model  # the body
    calls = []
    reference_net.register_forward_hook(lambda *_: calls.append(1))
    steps = 3
    sgd_steps(model, stack, [batch_of(seed=i) for i in range(steps)], lr=0.5)
    student_forwards = steps if use_lora else 0  # under LoRA the hook sees the student's forwards too
    assert len(calls) - student_forwards == steps == stack.reference.forwards
    assert stack.reference._logits is None  # freed once distill and kl have read it
    logs = stack.pop_logs()
    assert logs["reg/distill"] > 0 and logs["reg/kl"] > 0


# ---------------------------------------------------------------------------------------------------------------
# distill and kl


def naive_divergence(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, kind: str, temperature: float,
                     beta: float) -> torch.Tensor:  # fmt: skip
    """Position by position with explicit probabilities: sum p log(p / q), the mixture written out."""
    if labels.ndim == 1:
        student, teacher, labels = student[:, None], teacher[:, None], torch.stack([labels, labels], 1)
    values = []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] == IGNORE:
                continue
            ps = torch.softmax(student[b, t].double() / temperature, -1)
            pt = torch.softmax(teacher[b, t].double() / temperature, -1)
            if kind == "forward":
                d = (pt * (pt / ps).log()).sum()
            elif kind == "reverse":
                d = (ps * (ps / pt).log()).sum()
            else:
                m = beta * pt + (1 - beta) * ps
                d = beta * (pt * (pt / m).log()).sum() + (1 - beta) * (ps * (ps / m).log()).sum()
            values.append(temperature**2 * d)
    return torch.stack(values).mean()


@pytest.mark.parametrize("task", ["causal_lm", "classification"])
@pytest.mark.parametrize(("kind", "temperature"), [("forward", 2.0), ("reverse", 1.0), ("jsd", 1.5)])
def test_chunked_divergence_matches_naive_value_and_gradient(kind: str, temperature: float, task: str):
    gen = torch.Generator().manual_seed(0)
    if task == "causal_lm":
        labels = batch_of(3)["labels"]
        shape = (*labels.shape, 11)
    else:
        labels = torch.tensor([0, 1, 1, IGNORE, 0])
        shape = (5, 7)
    student = torch.randn(shape, generator=gen, dtype=torch.float64).float().requires_grad_(True)
    hidden, head = torch.randn((*shape[:-1], 4), generator=gen), torch.randn(shape[-1], 4, generator=gen)
    teacher = hidden @ head.T
    naive = naive_divergence(student, teacher, labels, kind, temperature, 0.3)
    (want,) = torch.autograd.grad(naive, student)
    heads = []  # the output layer's calls when the teacher's logits are made per chunk (Reference.logits)
    on_demand = TeacherLogits(at_positions(hidden, *loss_positions(labels)), lambda h: heads.append(h) or h @ head.T)
    for chunk, given in [(3, teacher), (10_000, teacher), (3, on_demand)]:  # chunks of 3 vs all positions at once
        value = divergence(student, given, labels, kind, temperature, 0.3, chunk)
        (grad,) = torch.autograd.grad(value, student)
        torch.testing.assert_close(value.double(), naive, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-7)
    assert [len(h) for h in heads[:-1]] == [3] * (len(heads) - 1) and len(on_demand) > 3


def test_divergence_leaves_a_teacher_given_at_the_loss_positions_unchanged():
    labels = batch_of(2)["labels"]
    student = torch.randn(*labels.shape, 7)
    teacher = at_positions(torch.randn(*labels.shape, 7), *loss_positions(labels))
    kept = teacher.clone()
    first = divergence(student, teacher, labels, "forward", 2.0)
    assert torch.equal(teacher, kept)  # per_chunk divides each chunk in place: it must get copies
    assert divergence(student, teacher, labels, "forward", 2.0) == first
    with pytest.raises(ValueError, match="loss positions"):
        divergence(student, teacher[1:], labels)


def test_the_reference_runs_under_the_runs_mixed_precision(tmp_path: Path):
    """bf16 autocast (Accelerate wraps the model's forward only): the reference's own body and output-layer calls
    must run under it too, or a fresh adapter's model differs from its reference (a small nonzero KL instead of 0)."""
    from transformers import TrainingArguments

    from tether.trainer import RegularizedTrainer

    model = lora(model_of())
    rows = rows_of(8, seed=7, task="causal_lm")
    stack = RegularizerStack.from_configs([REGISTRY["kl"].config(name="kl")])
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, bf16=True, report_to="none", max_steps=2, learning_rate=0.0,
        per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True, dataloader_pin_memory=False,
        logging_steps=1,
    )  # fmt: skip
    trainer = RegularizedTrainer(model=model, args=args, train_dataset=rows, data_collator=Collator(0), stack=stack)
    stack.setup(SetupContext(trainer.model, None, args.learning_rate))
    assert stack.reference.split
    trainer.train()
    logged = [h["reg/kl"] for h in trainer.state.log_history if "reg/kl" in h]
    assert len(logged) == 2 and all(value < 1e-12 for value in logged)


def test_divergence_is_zero_at_the_teacher_and_ignores_masked_positions():
    student = torch.randn(2, 6, 9)
    labels = torch.full((2, 6), IGNORE)
    labels[0, 3] = 5  # the only position with loss: logits[0, 2]
    other = student.clone()
    other[:, [0, 1, 3, 4, 5]] += 5.0  # everywhere else
    other[1] += 5.0
    for kind in ("forward", "reverse", "jsd"):
        assert divergence(student, student, labels, kind).item() == pytest.approx(0, abs=1e-6)
        assert divergence(student, other, labels, kind).item() == pytest.approx(0, abs=1e-6)


def mean_kl_to(original: nn.Module, model: nn.Module, batch: dict) -> float:
    return divergence(logits(model, batch), logits(original, batch), batch["labels"], "forward").item()


@pytest.mark.parametrize("name", ["kl", "distill"])
def test_kl_and_distill_keep_the_model_closer_to_the_original(name: str):
    batches = [batch_of(8, seed=i) for i in range(12)]
    held_out = batch_of(8, seed=99)
    distance = {}
    for strength in (0.0, 2.0):
        original, model = model_of(), model_of()
        stack = stack_of(model, {"name": name, "strength": strength})
        sgd_steps(model, stack, batches, lr=0.5)
        distance[strength] = mean_kl_to(original, model, held_out)
    assert distance[2.0] < 0.7 * distance[0.0], distance


# ---------------------------------------------------------------------------------------------------------------
# label_smoothing


@pytest.mark.parametrize("task", ["causal_lm", "sequence_classification"])
def test_label_smoothing_equals_torch_smoothed_cross_entropy(task: str):
    alpha = 0.2
    model = model_of("llama", task)
    batch = batch_of(4, task=task)
    if task == "causal_lm":
        batch["labels"][1, 6:] = IGNORE  # padding-like ignored tail
    out = model(**batch)
    stack = stack_of(model, {"name": "label_smoothing", "strength": alpha})
    total = out.loss + stack.penalty(model, batch, out)
    logits_, labels = out.logits, batch["labels"]
    if task == "causal_lm":
        logits_, labels = logits_[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1)
    want = F.cross_entropy(logits_, labels, ignore_index=IGNORE, label_smoothing=alpha)
    torch.testing.assert_close(total, want)
    got_grads = torch.autograd.grad(total, list(model.parameters()), retain_graph=True)
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_label_smoothing_leaves_the_evaluation_loss_unchanged(tmp_path: Path):
    from transformers import TrainingArguments

    from tether.trainer import RegularizedTrainer

    model = model_of()
    batch = batch_of(4)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = RegularizedTrainer(model=model, args=args, stack=stack_of(model, {"name": "label_smoothing"}))
    model.eval()
    assert trainer.compute_loss(model, batch).item() == pytest.approx(model(**batch).loss.item())
    model.train()
    assert trainer.compute_loss(model, batch).item() != pytest.approx(model(**batch).loss.item())
    assert uniform_minus_nll(model(**batch).logits, batch["labels"]).item() != 0


# ---------------------------------------------------------------------------------------------------------------
# dropout

MATRIX = [(arch, "sequence_classification" if arch in ENCODER_ONLY else "causal_lm") for arch in ARCHITECTURES]


@pytest.mark.parametrize(("arch", "task"), MATRIX, ids=[a for a, _ in MATRIX])
def test_dropout_sets_every_module_and_acts_in_training_only(arch: str, task: str):
    model = model_of(arch, task)
    roles = knobs(model)
    stack_of(model, {"name": "dropout", **dict.fromkeys(roles, 0.3)})
    for role, knob in roles.items():
        assert all(getattr(model.config, key) == 0.3 for key in knob.keys), role
    rates = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    rates += [m.attention_dropout for m in model.modules() if isinstance(vars(m).get("attention_dropout"), float)]
    assert rates and all(r == 0.3 for r in rates), rates
    batch = batch_of(2, task=task)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    torch.manual_seed(0)
    model.train()
    assert not torch.equal(model(**inputs).logits, model(**inputs).logits)
    model.eval()
    assert torch.equal(model(**inputs).logits, model(**inputs).logits)


def test_dropout_a_role_the_architecture_lacks_is_an_error():
    with pytest.raises(ConfigError, match="llama has no hidden dropout"):
        stack_of(model_of(), {"name": "dropout", "attention": 0.1, "hidden": 0.1})
    with pytest.raises(ConfigError, match="dropout adds no penalty, so strength is unused"):
        parse_entries([RegularizerEntry(name="dropout", strength=0.1)])


def test_dropout_under_lora_reaches_the_base_model():
    model = lora(model_of("gpt2"))
    stack_of(model, {"name": "dropout", "hidden": 0.25})
    base = model.get_base_model()
    assert base.transformer.h[0].mlp.dropout.p == 0.25 and base.config.resid_pdrop == 0.25
    assert all(m.p == 0.0 for n, m in model.named_modules() if "lora_dropout" in n and isinstance(m, nn.Dropout))


# ---------------------------------------------------------------------------------------------------------------
# neftune


def test_neftune_noise_scales_with_each_rows_own_length():
    alpha, dim = 10.0, 64
    mask = torch.zeros(3, 40, dtype=torch.long)
    for row, length in enumerate((4, 16, 40)):
        mask[row, :length] = 1
    torch.manual_seed(0)
    noise = noise_like(torch.zeros(3, 40, dim), mask, alpha)
    for row, length in enumerate((4, 16, 40)):
        bound = alpha / (length * dim) ** 0.5
        assert noise[row, :length].abs().max() <= bound
        assert noise[row, :length].abs().max() > 0.95 * bound  # uniform on [-bound, bound]
        assert not noise[row, length:].any()  # no noise on padding


def test_neftune_adds_noise_in_training_only_and_is_batch_independent():
    model = model_of()
    stack_of(model, {"name": "neftune", "alpha": 8.0})
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    batch = batch_of(3)
    clean = model.get_input_embeddings().weight[batch["input_ids"]].detach()
    model.train()
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    lengths = batch["attention_mask"].sum(1)
    for row, length in enumerate(lengths.tolist()):
        noise = (seen[-1][row] - clean[row]).abs()
        bound = 8.0 / (length * 16) ** 0.5  # the row's own length, not the padded width
        assert 0.5 * bound < noise[:length].max() <= bound + 1e-6
        assert not noise[length:].any()
    model.eval()
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert torch.equal(seen[-1], clean)


# ---------------------------------------------------------------------------------------------------------------
# replay


def rows(n: int, start: int = 0, length: int = 6) -> list[dict]:
    return [{"input_ids": [i] * length, "attention_mask": [1] * length, "labels": [IGNORE] * 2 + [i] * (length - 2)}
            for i in range(start, start + n)]  # fmt: skip


def test_replay_ratio_is_exact_deterministic_and_goes_through_the_source_before_repeating():
    train_rows, source = rows(40), rows(7, start=100)
    stack = RegularizerStack.from_configs([REGISTRY["replay"].config(name="replay", ratio=0.2)])
    mixed = stack.train_data(train_rows, source, seed=0)
    picked = mixed[len(train_rows) :]
    assert mixed[: len(train_rows)] == train_rows
    assert len(picked) == 10 and len(picked) / len(mixed) == 0.2
    ids = [r["input_ids"][0] for r in picked]
    assert sorted(ids[:7]) == list(range(100, 107))  # the whole source once before any repeat
    assert mix(train_rows, source, 0.2, "examples", 0) == picked
    assert mix(train_rows, source, 0.2, "examples", 1) != picked
    assert stack.after_training(None, None)["replay"]["examples"] == 10


def test_replay_by_tokens_counts_loss_tokens():
    train_rows, source = rows(30, length=6), rows(50, start=100, length=12)
    picked = mix(train_rows, source, 0.25, "tokens", seed=0)
    target = 0.25 / 0.75 * sum(map(loss_tokens, train_rows))
    got = sum(map(loss_tokens, picked))
    assert target <= got < target + loss_tokens(source[0])
    with pytest.raises(ConfigError, match="needs rows to replay"):
        RegularizerStack.from_configs([REGISTRY["replay"].config(name="replay")]).train_data(train_rows, None, 0)


# ---------------------------------------------------------------------------------------------------------------
# ema and wise_ft


@pytest.mark.parametrize("bias_correction", [True, False])
def test_ema_equals_a_hand_computed_average(bias_correction: bool):
    model = model_of()
    stack = stack_of(model, {"name": "ema", "decay": 0.7, "bias_correction": bias_correction})
    ema = stack.items[0][0]
    assert isinstance(ema, EMA)
    weights = [torch.cat([p.detach().flatten() for p in model.parameters()])]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stack.attach(model, opt)
    for i in range(4):
        model(**batch_of(seed=i)).loss.backward()
        opt.step()
        opt.zero_grad()
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    avg = torch.zeros_like(weights[0]) if bias_correction else weights[0].clone()
    for w in weights[1:]:
        avg = 0.7 * avg + 0.3 * w
    if bias_correction:
        avg = avg / (1 - 0.7**4)
    torch.testing.assert_close(torch.cat([a.flatten() for a in ema.average()]), avg)


class Finish:
    """A FinishContext that measures the validation loss of one batch and keeps what was saved."""

    def __init__(self, tmp_path: Path, batch: dict, reference_batch: dict | None = None) -> None:
        self.batch, self.reference_batch, self.saved = batch, reference_batch, {}
        self.ctx = FinishContext(tmp_path, self.evaluate, self.save)

    def evaluate(self, model: nn.Module) -> dict:
        model.eval()
        with torch.no_grad():
            out = {"target": {"val_loss": model(**self.batch).loss.item()}}
            if self.reference_batch is not None:
                ref = model(**self.reference_batch).loss.item()
                out["forgetting"] = {"reference_loss_after": ref, "delta_loss": ref}
        return out

    def save(self, model: nn.Module, name: str) -> Path:
        self.saved[name] = copy.deepcopy(model)
        return Path(name)


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_wise_ft_interpolates_between_the_original_and_the_fine_tuned_model(use_lora: bool, tmp_path: Path):
    model = lora(model_of()) if use_lora else model_of()
    original = copy.deepcopy(model)
    stack = stack_of(model, {"name": "wise_ft", "alphas": [0, 0.5, 1], "choose": "best_target"})
    sgd_steps(model, stack, [batch_of(8, seed=i) for i in range(5)], lr=0.5)
    tuned = copy.deepcopy(model)
    batch = batch_of(8, seed=50)
    finish = Finish(tmp_path, batch)
    result = stack.after_training(model, finish.ctx)["wise_ft"]
    by_alpha = {r["alpha"]: r["val_loss"] for r in result["alphas"]}
    assert by_alpha[0] == pytest.approx(finish.evaluate(original)["target"]["val_loss"], rel=1e-5)
    assert by_alpha[1] == pytest.approx(finish.evaluate(tuned)["target"]["val_loss"], rel=1e-5)
    assert result["chosen_alpha"] == min(by_alpha, key=by_alpha.get)
    torch.testing.assert_close(logits(model, batch), logits(tuned, batch))  # the trained weights are back
    assert set(finish.saved) == {"model_wise_ft"} and (tmp_path / "wise_ft.png").exists()
    # alpha = 0.5 is halfway in weight space; under LoRA, W + 0.5 * delta W (merged weights compared)
    wise = stack.items[0][0]
    wise.interpolate([p.detach().clone() for p in wise.params], 0.5)
    merged = [merged_weights(m) for m in (original, tuned, model)]
    for name, half in merged[2].items():
        torch.testing.assert_close(half, (merged[0][name] + merged[1][name]) / 2, atol=1e-6, rtol=1e-5, msg=name)


def merged_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights the model computes with: LoRA updates merged into a copy."""
    model = copy.deepcopy(model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return {n: p.detach() for n, p in model.named_parameters()}


def test_wise_ft_chooses_the_least_forgetting_alpha_within_tolerance(tmp_path: Path):
    from tether.regularizers.wise_ft import choose

    rows_ = [
        {"alpha": 0.0, "val_loss": 3.0, "reference_loss": 1.0},
        {"alpha": 0.5, "val_loss": 2.05, "reference_loss": 1.5},
        {"alpha": 1.0, "val_loss": 2.0, "reference_loss": 3.0},
    ]
    assert choose(rows_, "least_forgetting", 0.05) == 0.5
    assert choose(rows_, "least_forgetting", 0.01) == 1.0
    assert choose(rows_, "best_target", 0.05) == 1.0


def test_wise_ft_reports_the_rule_it_applied(tmp_path: Path):
    """Without reference data least_forgetting has nothing to measure: the results say best_target, as applied."""
    batch = batch_of(8, seed=50)
    for reference, rule in ((None, "best_target"), (batch_of(8, seed=51), "least_forgetting")):
        model = model_of()
        stack = stack_of(model, {"name": "wise_ft", "alphas": [0, 1]})
        sgd_steps(model, stack, [batch_of(8, seed=i) for i in range(2)], lr=0.5)
        assert stack.after_training(model, Finish(tmp_path, batch, reference).ctx)["wise_ft"]["choose"] == rule
    with pytest.raises(ConfigError, match="needs an adapter created by this run"):
        stack_of(lora(model_of(), trained=True), {"name": "wise_ft"})


# ---------------------------------------------------------------------------------------------------------------
# end to end


def test_train_with_distill_replay_ema_and_wise_ft(raw_config: dict, tmp_path: Path):
    raw = copy.deepcopy(raw_config)
    raw["training"] = {"learning_rate": 3e-3, "max_steps": 6, "per_device_train_batch_size": 8, "eval_steps": 3,
                       "logging_steps": 2}  # fmt: skip
    raw["regularizers"] = [
        {"name": "distill", "strength": 0.5},
        {"name": "replay", "ratio": 0.2},
        {"name": "ema", "decay": 0.9},
        {"name": "wise_ft", "alphas": [0.0, 1.0]},
    ]
    out = tmp_path / "run"
    metrics = train(validate_config(raw), out)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["replay"]["examples"] == 12 and saved["replay"]["share_examples"] == 0.2  # 12 / (48 + 12)
    assert saved["ema"]["steps"] == 6 and saved["ema"]["target"]["val_loss"] > 0
    assert "forgetting" in saved["ema"]
    wise = {r["alpha"]: r for r in saved["wise_ft"]["alphas"]}
    assert wise[1.0]["val_loss"] == pytest.approx(metrics["target"]["val_loss"], rel=1e-5)
    assert wise[0.0]["reference_loss"] == pytest.approx(metrics["forgetting"]["reference_loss_before"], rel=1e-5)
    for name in ("model_ema/model.safetensors", "model_wise_ft/model.safetensors", "wise_ft.png"):
        assert (out / name).exists(), name
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert all("reg/distill" in h for h in history if "loss" in h)


def test_the_row_cache_does_not_change_a_training_run(raw_config: dict, tmp_path: Path):
    """LoRA + kl + distill + replay for 2.5 epochs: with the row cache (later epochs read the original model's
    outputs from it) the run logs the same losses and penalties and ends where the run without it does."""
    runs = {}
    for cache_mb in (0, 64):
        raw = copy.deepcopy(raw_config)
        raw["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
        raw["training"] = {"learning_rate": 3e-3, "max_steps": 18, "per_device_train_batch_size": 8,
                           "eval_strategy": "no", "logging_steps": 1}  # fmt: skip
        raw["regularizers"] = [
            {"name": "kl", "strength": 0.5, "reference": {"cache_mb": cache_mb}},
            {"name": "distill"},
            {"name": "replay", "ratio": 0.2},
        ]
        metrics = train(validate_config(raw), tmp_path / str(cache_mb))
        history = [json.loads(line) for line in (tmp_path / str(cache_mb) / "history.jsonl").read_text().splitlines()]
        logged = [(h["loss"], h["reg/kl"], h["reg/distill"]) for h in history if "loss" in h]
        runs[cache_mb] = (metrics["target"]["val_loss"], logged)
    assert len(runs[0][1]) == 18
    assert runs[64][0] == pytest.approx(runs[0][0], rel=1e-5)
    for without, cached in zip(runs[0][1], runs[64][1]):
        assert cached == pytest.approx(without, rel=1e-4, abs=1e-6)
