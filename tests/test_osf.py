"""osf: PEFT's OSF (orthogonal subspace fine-tuning) as an adapter of `tether train`: PEFT's own model, the frozen
directions, the merged save, the reference under kl, l2_sp's pull, and the refusals."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainingArguments

from tests.test_matrix import CASES
from tests.test_param_regularizers import VOCAB as ROWS_VOCAB
from tests.test_param_regularizers import rows_of
from tether.config import OsfSection, validate_config
from tether.data import Collator
from tether.errors import ConfigError
from tether.inspect import inspect_run, render
from tether.models import apply_osf, is_osf, load_model, merged_osf
from tether.reference import Reference, ReferenceOptions
from tether.regularizers import REGISTRY, FinishContext, RegularizerStack, SetupContext
from tether.run import _save_model, evaluate_saved, train
from tether.synthetic import char_tokenizer, tiny_model
from tether.trainer import RegularizedTrainer

VOCAB = 40


def tiny(arch: str = "llama", task: str = "causal_lm") -> torch.nn.Module:
    """In eval mode: the comparisons below are between forwards, which dropout would make differ."""
    return tiny_model(arch, task, VOCAB, hidden_size=32, num_layers=2, num_heads=4, seed=0).eval()


def batch(task: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(4, VOCAB, (4, 10), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids if task == "causal_lm" else torch.tensor([0, 1, 1, 0])}


def _raw(raw_config: dict, regularizers: list | None = None, **training) -> dict:
    raw = copy.deepcopy(raw_config)
    raw["osf"] = {"effective_rank": 0.5}
    raw["regularizers"] = regularizers or []
    raw["training"].update({"max_steps": 8, "learning_rate": 1e-2, "eval_strategy": "no", "save_strategy": "no"})
    raw["training"].update(training)
    return raw


def changes(cfg, run: Path) -> dict[str, torch.Tensor]:
    """Each weight of the saved model/ minus the original one."""
    before = load_model(cfg.model, cfg.task).model.state_dict()
    after = load_file(str(run / "model" / "model.safetensors"))
    return {name: after[name] - before[name] for name in after}


def touching_top(original: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """The part of `change` in the row or column space of `original`'s top half of singular directions (what OSF
    freezes at effective_rank 0.5): change - (I - U U^T) change (I - V^T V)."""
    u, _, vh = torch.linalg.svd(original, full_matrices=False)
    k = min(original.shape) // 2
    u, vh = u[:, :k], vh[:k]
    outside = change - u @ (u.T @ change)
    return change - (outside - (outside @ vh.T) @ vh)


@pytest.mark.parametrize(("arch", "task"), [("llama", "causal_lm"), ("bert", "sequence_classification")])
def test_tethers_osf_is_pefts_own(arch, task):
    from peft import OSFConfig, TaskType, get_peft_model

    model = tiny(arch, task)
    before = model(**batch(task)).logits
    ours = apply_osf(copy.deepcopy(model), OsfSection(effective_rank=0.5), task)
    kind = TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.SEQ_CLS
    theirs = get_peft_model(copy.deepcopy(model), OSFConfig(effective_rank=0.5, target_modules="all-linear",
                                                            task_type=kind))  # fmt: skip
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    peft = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    assert mine.keys() == peft.keys() and any("osf_svd_params" in n for n in mine)
    if task != "causal_lm":  # the head trains whole, as under LoRA
        assert any(".classifier.modules_to_save." in n for n in mine)
    torch.testing.assert_close(ours(**batch(task)).logits, before, rtol=1e-4, atol=1e-5)  # unchanged at the start
    for m in (ours, theirs):
        m(**batch(task)).loss.backward()
        torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5).step()
    for name in mine:
        torch.testing.assert_close(mine[name].grad, peft[name].grad, msg=name)
    torch.testing.assert_close(ours(**batch(task)).logits, theirs(**batch(task)).logits)
    assert not torch.allclose(ours(**batch(task)).logits, before)


@pytest.mark.parametrize("optim", ["sgd", "adamw_torch"])
def test_the_frozen_directions_stay_put_under_sgd_not_under_adam(raw_config, tmp_path, optim):
    """PEFT projects the gradients off the frozen directions. SGD's update is that gradient, so the top singular
    directions of each adapted weight do not move at all; Adam's per-coordinate scaling turns the projected gradient
    into an update that is not projected, so some of the change reaches them (less than under full fine-tuning)."""
    lr = 0.5 if optim == "sgd" else 1e-2
    cfg = validate_config(_raw(raw_config, optim=optim, learning_rate=lr))
    train(cfg, tmp_path / "osf")
    before = load_model(cfg.model, cfg.task).model.state_dict()
    delta = changes(cfg, tmp_path / "osf")
    adapted = [n for n in delta if ".layers." in n and delta[n].ndim == 2]
    assert len(adapted) == 14  # 7 linear layers x 2 blocks
    assert all(torch.equal(d, torch.zeros_like(d)) for n, d in delta.items() if n not in adapted)  # nothing else
    total = torch.stack([delta[n].norm() for n in adapted]).norm()
    top = torch.stack([touching_top(before[n], delta[n]).norm() for n in adapted]).norm()
    assert total > 1e-3
    if optim == "sgd":
        assert top < 1e-5 * total
        return
    full_cfg = validate_config(_raw(raw_config, optim=optim, learning_rate=lr) | {"osf": None})
    train(full_cfg, tmp_path / "full")
    full = changes(full_cfg, tmp_path / "full")
    full_top = torch.stack([touching_top(before[n], full[n]).norm() for n in adapted]).norm()
    full_total = torch.stack([full[n].norm() for n in adapted]).norm()
    assert 1e-3 * total < top < 0.5 * total * full_top / full_total


def test_the_saved_model_is_the_merged_one_and_the_trained_model_keeps_its_adapter(tmp_path):
    from transformers import AutoModelForCausalLM

    model = apply_osf(tiny(), OsfSection(effective_rank=0.5), "causal_lm")
    model(**batch("causal_lm")).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    trained = model(**batch("causal_lm")).logits
    _save_model(model, char_tokenizer(), tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
    assert is_osf(model) and torch.equal(model(**batch("causal_lm")).logits, trained)  # not merged in place
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded(**batch("causal_lm")).logits, trained, rtol=1e-4, atol=1e-5)


def test_train_saves_a_model_that_tether_eval_measures_as_train_did(raw_config, tmp_path):
    cfg = validate_config(_raw(raw_config))
    metrics = train(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    scored = evaluate_saved(cfg, tmp_path / "run" / "model")
    assert scored["target"]["val_loss"] == pytest.approx(metrics["target"]["val_loss"], rel=1e-5)
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "library_name: transformers" in card and "PEFT's OSF" in card


def test_the_reference_is_the_model_with_the_adapter_off_and_kl_acts(raw_config, tmp_path):
    model = tiny()
    original = model(**batch("causal_lm")).logits
    osf = apply_osf(model, OsfSection(effective_rank=0.5), "causal_lm")
    assert Reference.build(osf, ReferenceOptions()).mode == "disable"  # outputs unchanged at setup: no clone
    with torch.no_grad():
        for p in osf.parameters():
            if p.requires_grad:
                p.add_(0.1)
    with osf.disable_adapter():
        torch.testing.assert_close(osf(**batch("causal_lm")).logits, original)
    cfg = validate_config(_raw(raw_config, [{"name": "kl", "strength": 5.0}]))
    assert inspect_run(cfg)["reference"]["mode"] == "disable"
    train(cfg, tmp_path / "kl")
    plain = validate_config(_raw(raw_config))
    train(plain, tmp_path / "plain")
    with_kl, without = changes(cfg, tmp_path / "kl"), changes(plain, tmp_path / "plain")
    assert any(not torch.allclose(with_kl[n], without[n]) for n in with_kl)


def test_l2_sp_pulls_the_trained_directions_toward_their_start(raw_config, tmp_path):
    """l2_sp anchors U_low, S_low, V_low (the trainable tensors) at their start: the weights move less with it."""
    distance = {}
    for strength in (0.0, 50.0):
        cfg = validate_config(_raw(raw_config, [{"name": "l2_sp", "strength": strength}]))
        train(cfg, tmp_path / str(strength))
        distance[strength] = torch.stack([d.norm() for d in changes(cfg, tmp_path / str(strength)).values()]).norm()
    assert 0 < distance[50.0] < 0.8 * distance[0.0]


def test_inspect_shows_the_adapter(raw_config):
    plan = inspect_run(validate_config(_raw(raw_config)))
    assert plan["model"]["osf"] == {"layers": 14, "frozen_directions": 14 * 16, "trained_directions": 14 * 16}
    assert "OSF (14 layers" in render(plan)[0]


@pytest.mark.slow
def test_on_the_demo_world_osf_forgets_less_than_full_fine_tuning_at_the_same_lr(tmp_path):
    """benchmarks/adapters.py's setting (lr 1e-2, 200 steps): the facts' loss rises less, more of them are recalled."""
    from tether.harness.demo import demo_config
    from tether.synthetic import pretrained_base

    runs = {}
    for name, sections in (("full", {}), ("osf", {"osf": {"effective_rank": 0.5}})):
        raw = demo_config(pretrained_base(), []) | sections
        raw["training"].update(learning_rate=1e-2, eval_strategy="no", save_strategy="no")
        runs[name] = train(validate_config(raw), tmp_path / name)["forgetting"]
    assert runs["osf"]["delta_loss"] < 0.5 * runs["full"]["delta_loss"]
    assert runs["osf"]["recall_after"] >= runs["full"]["recall_after"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lora": {"r": 4}}, "lora and osf are two kinds of adapter"),
        ({"lora": {"r": 4, "init": "corda_kpm"}}, "lora and osf are two kinds of adapter"),
        ({"regularizers": [{"name": "intruder"}]}, "intruder reduces a LoRA adapter's intruder dimensions"),
        ({"osf": {"effective_rank": 1.0}}, r"osf.effective_rank: a fraction lies in \(0, 1\)"),
        ({"osf": {"effective_rank": 0}}, "osf.effective_rank: a count of frozen directions must be 1 or more"),
    ],
)
def test_contradictions_are_refused_from_the_config(raw_config, change, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(_raw(raw_config) | change)


@pytest.mark.parametrize(
    ("arch", "section", "message"),
    [
        ("llama", {"target_modules": ["nope"]}, "osf: PEFT refuses this model's OSF: Target modules"),
        ("llama", {"effective_rank": 64}, "osf.effective_rank 64 freezes every direction of"),
        ("llama", {"effective_rank": 0.01}, "should be a positive integer"),
        ("gpt2", {}, r"PEFT's OSF adapts nn.Linear layers only, not transformer.h.0.attn.c_attn \(Conv1D\)"),
        ("llama", {"target_modules": ["mlp"]}, r"not model.layers.0.mlp \(LlamaMLP\)"),
    ],
)
def test_what_would_train_nothing_is_refused(arch, section, message):
    with pytest.raises(ConfigError, match=message):
        apply_osf(tiny(arch), OsfSection(**section), "causal_lm")


def test_a_target_that_matches_nothing_stops_train_before_writing(raw_config, tmp_path):
    raw = _raw(raw_config)
    raw["osf"]["target_modules"] = ["nope"]
    with pytest.raises(ConfigError, match="osf: PEFT refuses"):
        train(validate_config(raw), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_fully_shard_loses_the_projection_hooks(tmp_path):
    """Why `tether train` refuses osf under FSDP: fully_shard replaces each parameter, and PEFT's hooks sit on the
    replaced ones, so the gradients come out unprojected (one process, gloo)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = apply_osf(tiny(), OsfSection(effective_rank=0.5, target_modules=["q_proj"]), "causal_lm")
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        start = layer._osf_U_low_init["default"]  # square U: its columns span all that may change
        fully_shard(model.base_model.model, mesh=init_device_mesh("cpu", (1,)))
        model(**batch("causal_lm")).loss.backward()
        grad = layer.osf_svd_params["default"]["U_low"].grad.full_tensor()
        assert (grad - start @ (start.T @ grad)).norm() > 0.1 * grad.norm()
    finally:
        dist.destroy_process_group()


STEP_CASES = {name: fields for name, (fields, acts_in_step) in CASES.items() if acts_in_step}
PLAIN_OSF: dict[str, torch.Tensor] = {}


def trained_osf(tmp_path: Path, name: str | None) -> dict[str, torch.Tensor]:
    """OSF's trainable tensors after 3 steps of the real RegularizedTrainer with one regularizer (or none), as
    tests/test_matrix.py runs full and LoRA."""
    model = apply_osf(tiny_model("llama", "causal_lm", ROWS_VOCAB, hidden_size=16, num_layers=2, num_heads=2, seed=0),
                      OsfSection(effective_rank=0.5), "causal_lm")  # fmt: skip
    stack = RegularizerStack.from_configs([REGISTRY[name].config(name=name, **STEP_CASES[name])] if name else [])
    args = TrainingArguments(
        str(tmp_path), max_steps=3, learning_rate=1e-2, per_device_train_batch_size=4, save_strategy="no",
        report_to=[], use_cpu=True, seed=0, lr_scheduler_type="constant",
    )  # fmt: skip
    reference = rows_of(4, "causal_lm", 2)
    rows = stack.train_data(rows_of(12, "causal_lm", 1), reference, 0, ctx=SetupContext(model))  # as tether.run does
    trainer = RegularizedTrainer(model=model, args=args, train_dataset=rows, data_collator=Collator(0), stack=stack)
    batches = [Collator(0)(reference[i : i + 2]) for i in (0, 2)]
    stack.setup(SetupContext(trainer.model, lambda shard=True: iter(batches), 1e-2))
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", sorted(STEP_CASES))
def test_every_regularizer_that_acts_in_the_step_acts_under_osf(tmp_path, name):
    if not PLAIN_OSF:
        PLAIN_OSF.update(trained_osf(tmp_path / "plain", None))
    on = trained_osf(tmp_path / "on", name)
    assert on.keys() == PLAIN_OSF.keys() and all(torch.isfinite(w).all() for w in on.values())
    assert any(not torch.equal(PLAIN_OSF[n], on[n]) for n in on), f"{name}: the same weights as without it"


def test_a_stack_set_up_on_an_osf_model_refuses_intruder():
    """Through the Python API there is no config to refuse it: the stack's setup reads the adapter from the model."""
    model = apply_osf(tiny(), OsfSection(), "causal_lm")
    stack = RegularizerStack.from_configs([REGISTRY["intruder"].config(name="intruder")])
    with pytest.raises(ConfigError, match="intruder reduces a LoRA adapter's intruder dimensions"):
        stack.setup(SetupContext(model))


# ---------------------------------------------------------------------------------------------------------------
# wise_ft and merge under OSF: each candidate is W_0 + w * delta W of each adapted layer


def moved_osf(arch: str, task: str, *entries: dict) -> tuple[dict[str, torch.Tensor], torch.nn.Module, list]:
    """(the original weights, an OSF model whose U_low, S_low, V_low (and head) moved by a seeded random step after
    the regularizers in `entries` were set up on it, those regularizers)."""
    model = tiny(arch, task)
    original = {n: t.clone() for n, t in model.state_dict().items()}
    osf = apply_osf(model, OsfSection(effective_rank=0.5), task)
    regs = [REGISTRY[e["name"]].cls(REGISTRY[e["name"]].config(**e)) for e in entries]
    for reg in regs:
        reg.setup(SetupContext(osf))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in osf.parameters():
            if p.requires_grad:
                p.add_(0.1 * p.abs().mean().clamp(min=0.01) * torch.randn(p.shape, generator=gen))  # a zero bias too
    return original, osf, regs


class SavedCandidates:
    """A FinishContext that records the merged weights of every model measured and saves through tether.run's save
    (for OSF: merged_osf), as a run does."""

    def __init__(self, tmp_path: Path, task: str) -> None:
        self.task, self.dir, self.measured = task, tmp_path, []
        self.ctx = FinishContext(tmp_path, self.evaluate, self.save)

    def evaluate(self, model: torch.nn.Module) -> dict:
        merged = merged_osf(model)
        self.measured.append({n: t.clone() for n, t in merged.state_dict().items()})
        with torch.no_grad():
            out = model(**batch(self.task))
            torch.testing.assert_close(out.logits, merged(**batch(self.task)).logits, rtol=1e-4, atol=1e-5)
        return {"target": {"val_loss": out.loss.item()}}  # what is measured is the merged candidate

    def save(self, model: torch.nn.Module, name: str) -> Path:
        _save_model(model, char_tokenizer(), self.dir / name)
        return self.dir / name

    def saved(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.dir / name / "model.safetensors"))


def interpolation(original: dict, trained: dict, weight) -> dict[str, torch.Tensor]:
    """W_0 + w * (W_1 - W_0) of each tensor, w a number or a function of the tensor's name."""
    w = weight if callable(weight) else lambda name: weight
    return {n: original[n] + w(n) * (trained[n] - original[n]) for n in trained}


def assert_same(got: dict, expected: dict, msg: str = "") -> None:
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-6, msg=f"{msg} {n}")


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (the adapted layers' weights, U_low, S_low, V_low and their starts)."""
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


@pytest.mark.parametrize(("arch", "task"), [("llama", "causal_lm"), ("bert", "sequence_classification")])
def test_wise_ft_candidates_under_osf_are_the_original_plus_alpha_times_the_weight_change(tmp_path, arch, task):
    original, model, (wise,) = moved_osf(arch, task, {"name": "wise_ft", "alphas": [0, 0.3, 0.7, 1]})
    trained, before = merged_osf(model).state_dict(), weights_of(model)
    moved = [n for n in trained if not torch.equal(trained[n], original[n])]  # the adapted weights (and the head)
    assert wise.memory() == {"start weights": sum(original[n].numel() * 4 for n in moved)}  # W_0, not U, S, V
    finish = SavedCandidates(tmp_path, task)
    result = wise.after_training(model, finish.ctx)
    for alpha, measured in zip(wise.config.alphas, finish.measured):
        assert_same(measured, interpolation(original, trained, alpha), f"alpha {alpha}")
    assert_same(finish.saved("model_wise_ft"), interpolation(original, trained, result["chosen_alpha"]))
    after = weights_of(model)
    assert all(torch.equal(after[n], before[n]) for n in before)  # U, S, V trained and W_0, bit for bit


def test_wise_ft_saves_under_osf_the_interpolation_of_the_merged_models(raw_config, tmp_path):
    """Through `tether train`: model_wise_ft/ at alpha 0.5 is halfway between the original and model/ (the merged
    fine-tuned model), and differs from both. Interpolating U_low, S_low, V_low elementwise would not be."""
    cfg = validate_config(_raw(raw_config, [{"name": "wise_ft", "alphas": [0.5]}]))
    train(cfg, tmp_path / "run")
    original = load_model(cfg.model, cfg.task).model.state_dict()
    tuned = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    wise = load_file(str(tmp_path / "run" / "model_wise_ft" / "model.safetensors"))
    assert wise.keys() == tuned.keys()
    assert any(not torch.allclose(wise[n], tuned[n]) for n in wise)
    assert any(not torch.allclose(wise[n], original[n]) for n in wise)
    assert_same(wise, interpolation(original, tuned, 0.5))


def test_merge_candidates_under_osf_act_on_each_weight_change_and_fisher_is_left_out(tmp_path):
    fields = {"alphas": [0, 0.5, 1], "densities": [0.5], "search_evaluations": 4, "fisher_scales": [1.0]}
    original, model, (merge,) = moved_osf("llama", "causal_lm", {"name": "merge", **fields})
    trainable_ = {n: torch.rand(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable_, str(tmp_path / "fisher.safetensors"))  # what ewc writes: the Fisher of U_low, S_low, V_low
    trained, before = merged_osf(model).state_dict(), weights_of(model)
    delta = {n: trained[n] - original[n] for n in trained}
    finish = SavedCandidates(tmp_path, "causal_lm")
    result = merge.after_training(model, finish.ctx)
    rows = result["candidates"]
    assert {r["method"] for r in rows} == {"global", "layers", "dare", "ties"} and "OSF" in result["fisher"]
    for row, measured in zip(rows, finish.measured):
        change = {n: measured[n] - original[n] for n in delta}
        a, d = row["alpha"], row.get("density")
        if row["method"] == "global":
            expected = {n: a * delta[n] for n in delta}
        elif row["method"] == "layers":  # block i is depth i: the adapted weights are all in the blocks
            expected = {
                n: row["layer_alphas"][block(n)] * delta[n] if ".layers." in n else 0 * delta[n] for n in delta
            }
        elif row["method"] == "ties":
            expected = {n: a * delta[n] * top(delta[n], d) for n in delta}
        else:  # dare: each entry of delta W dropped or divided by the density
            expected = {n: torch.where(change[n] == 0, 0.0, a * delta[n] / d) for n in delta}
            kept = torch.cat([(change[n] != 0).flatten() for n in delta if delta[n].any()]).float().mean()
            assert 0.4 < kept < 0.6, row["candidate"]
        assert_same(change, expected, row["candidate"])
    chosen = next(m for r, m in zip(rows, finish.measured) if r["candidate"] == result["chosen"])
    assert_same(finish.saved("model_merge"), chosen)
    after = weights_of(model)
    assert all(torch.equal(after[n], before[n]) for n in before)  # U, S, V trained and W_0, bit for bit


def block(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


def top(delta: torch.Tensor, density: float) -> torch.Tensor:
    """1 at the int(density * numel) entries of delta largest in magnitude (TIES's trim), 0 elsewhere."""
    mask = torch.zeros(delta.numel())
    mask[delta.abs().flatten().topk(int(density * delta.numel())).indices] = 1
    return mask.view_as(delta)
