"""Parameter-space regularizers (l1, l2, l2_sp, ewc, si, llrd): parity with naive references, behaviour, traps."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tether.data import Collator
from tether.errors import ConfigError
from tether.regularizers import REGISTRY, RegularizerStack, SetupContext
from tether.regularizers.base import trainable_weights
from tether.regularizers.ewc import estimate_fisher
from tether.regularizers.llrd import depths
from tether.step import train_step
from tether.synthetic import ARCHITECTURES, ENCODER_ONLY, tiny_model

VOCAB = 48
QUADRATIC = ["l1", "l2", "l2_sp", "ewc", "si"]


def model_of(arch: str = "llama", task: str = "causal_lm", hidden: int = 16, seed: int = 0) -> nn.Module:
    return tiny_model(arch, task, VOCAB, hidden_size=hidden, num_layers=2, num_heads=2, seed=seed)


def rows_of(n: int, task: str = "causal_lm", seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(4, VOCAB) for _ in range(rng.randint(6, 12))]
        labels = rng.randrange(2) if task != "causal_lm" else [-100] * 3 + ids[3:]
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return out


def batches_of(rows: list[dict[str, Any]], size: int):
    collate = Collator(0)
    return lambda shard=True: (collate(rows[i : i + size]) for i in range(0, len(rows), size))


def build(name: str, model: nn.Module, refs=None, lr: float = 1e-2, **fields: Any) -> RegularizerStack:
    config = REGISTRY[name].config(name=name, **fields)
    stack = RegularizerStack.from_configs([config])
    stack.setup(SetupContext(model, refs, lr))
    return stack


def perturb(model: nn.Module, seed: int = 1, size: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * size)


def optimizer_of(model: nn.Module, stack: RegularizerStack, lr: float, sgd: bool = False) -> torch.optim.Optimizer:
    groups = stack.optimizer_groups(model, lr)
    opt = torch.optim.SGD(groups, lr=lr) if sgd else torch.optim.AdamW(groups, lr=lr)
    stack.attach(model, opt)
    return opt


def train(model: nn.Module, stack: RegularizerStack, batches, steps: int, lr: float = 1e-2, sgd: bool = False):
    """tether.step.train_step, the step RegularizedTrainer takes, without the Trainer's data and logging around it."""
    opt = optimizer_of(model, stack, lr, sgd)
    model.train()
    data = list(batches())
    for step in range(steps):
        train_step(model, data[step % len(data)], opt, stack)
    return opt


def reference_value(name: str, stack: RegularizerStack, model: nn.Module, theta0: dict[str, torch.Tensor]):
    """The penalty by a plain loop over parameters, through autograd, in fp64."""
    reg = stack.items[0][0]
    total = torch.zeros((), dtype=torch.float64)
    if name in ("l1", "l2"):
        for _, p in trainable_weights(model):
            total = total + (p.double().abs().sum() if name == "l1" else 0.5 * p.double().square().sum())
        return total
    weights = dict(zip(map(id, reg.params), reg.weights)) if name in ("ewc", "si") else {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            w = weights[id(p)].double() if weights else 1.0
            total = total + 0.5 * (w * (p.double() - theta0[n].double()).square()).sum()
    return total


def naive_pull(name: str, stack: RegularizerStack, model: nn.Module, theta0: dict[str, torch.Tensor]):
    """The penalty's gradient for each trainable tensor, written out in fp64 (autograd through a bf16 parameter
    would round it to bf16)."""
    reg = stack.items[0][0]
    weights = dict(zip(map(id, reg.params), reg.weights)) if name in ("ewc", "si") else {}
    decayed = {id(p) for _, p in trainable_weights(model)}
    pulls = []
    for n, p in model.named_parameters():
        x = p.detach().double()
        if not p.requires_grad:
            continue
        if name in ("l1", "l2"):
            pulls.append((x.sign() if name == "l1" else x) * (id(p) in decayed))
        else:
            w = weights[id(p)].double() if weights else 1.0
            pulls.append(w * (x - theta0[n].double()))
    return pulls


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def seed_grads(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(7)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype) if p.requires_grad else None


def use_fused_lists(stack: RegularizerStack) -> None:
    """Take the accelerators' path on CPU: whole-list foreach ops instead of the tensor-by-tensor scratch loop."""
    reg = stack.items[0][0]
    if type(reg).__name__ != "L2":  # l2 has one path: a single foreach add
        reg.views = None


PATHS = ["cpu_scratch", "fused_lists"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", QUADRATIC)
def test_penalty_grad_matches_naive_autograd(name: str, path: str) -> None:
    torch.manual_seed(0)
    model, rows = model_of(), rows_of(8)
    theta0 = snapshot(model)
    stack = build(name, model, batches_of(rows, 4), strength=0.3, **({"form": "penalty"} if name == "l2_sp" else {}))
    if path == "fused_lists":
        use_fused_lists(stack)
    assert torch.equal(snapshot(model)["lm_head.weight"], theta0["lm_head.weight"])  # setup leaves the model as is
    perturb(model)
    seed_grads(model)
    expected_value = reference_value(name, stack, model, theta0)
    params = [p for p in model.parameters() if p.requires_grad]
    extra = torch.autograd.grad(0.3 * expected_value, params, allow_unused=True, materialize_grads=True)
    expected = [p.grad.double() + e for p, e in zip(params, extra)]
    unused = {id(model.model.layers[0].self_attn.q_proj.weight), id(model.model.norm.weight)}
    for p in params:
        p.grad = None if id(p) in unused else p.grad  # a tensor without a gradient this step is left alone
    stack.before_step()
    assert stack.pop_logs()[f"reg/{name}"] == pytest.approx(expected_value.item(), rel=1e-5)
    for p, e in zip(params, expected):
        if id(p) in unused:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad.double(), e, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", QUADRATIC)
def test_bf16_value_and_gradient_are_not_lost_to_rounding(name: str, path: str) -> None:
    torch.manual_seed(0)
    model = model_of().to(torch.bfloat16)
    theta0 = snapshot(model)
    stack = build(
        name, model, batches_of(rows_of(8), 4), strength=1.0, **({"form": "penalty"} if name == "l2_sp" else {})
    )
    if path == "fused_lists":
        use_fused_lists(stack)
    perturb(model, size=0.01)
    seed_grads(model)
    exact = reference_value(name, stack, model, theta0)  # fp64 over the same bf16 values
    params = [p for p in model.parameters() if p.requires_grad]
    pull = naive_pull(name, stack, model, theta0)
    expected = [(p.grad.double() + e).to(torch.bfloat16) for p, e in zip(params, pull)]  # rounded once, at the end
    stack.before_step()
    assert stack.pop_logs()[f"reg/{name}"] == pytest.approx(exact.item(), rel=1e-5)  # a bf16 result is off by ~1e-3
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, atol=0, rtol=2**-8)  # at most one bf16 rounding step apart


@pytest.mark.parametrize("name", QUADRATIC)
def test_closed_form_value_is_taken_when_logged_at_the_weights_then(name: str) -> None:
    """The steps add the pull's gradient only; pop_logs values the penalty once, at the weights it finds."""
    torch.manual_seed(0)
    model = model_of()
    theta0 = snapshot(model)
    stack = build(name, model, batches_of(rows_of(8), 4), strength=0.3)
    reg, calls = stack.items[0][0], []
    value_now = reg.penalty_value
    reg.penalty_value = lambda: calls.append(1) or value_now()
    train(model, stack, batches_of(rows_of(8, seed=1), 4), steps=3)
    assert calls == []
    logged = stack.pop_logs()[f"reg/{name}"]
    assert len(calls) == 1 and logged == pytest.approx(reference_value(name, stack, model, theta0).item(), rel=1e-5)
    assert logged > 0


def naive_lora_l2_sp(model: nn.Module, layers: list[nn.Module], before: dict, heads: dict) -> torch.Tensor:
    """The naive way: form each Delta W (d x d) and compare it with its value at setup; the head elementwise."""
    total = torch.zeros((), dtype=torch.float64)
    for m in layers:
        a, b, s = m.lora_A["default"].weight, m.lora_B["default"].weight, m.scaling["default"]
        total = total + 0.5 * (s * (b.double() @ a.double() - before[id(m)].double())).square().sum()
    for n, p in model.named_parameters():
        if n in heads:
            total = total + 0.5 * (p.double() - heads[n].double()).square().sum()
    return total


@pytest.mark.parametrize("form", ["penalty", "decoupled"])
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh_adapter", "nonzero_B0"])
def test_l2_sp_under_lora_pulls_the_effective_weight_change(fresh: bool, form: str) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS", init_lora_weights=fresh)
    model = get_peft_model(model_of(task="sequence_classification"), lora)
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    before = {id(m): (m.lora_B["default"].weight @ m.lora_A["default"].weight).detach().clone() for m in layers}
    heads = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert heads, "the classifier head trains (modules_to_save) and is pulled elementwise"
    stack = build("l2_sp", model, strength=0.5, form=form)
    perturb(model, size=0.2)
    seed_grads(model)
    total = naive_lora_l2_sp(model, layers, before, heads)
    params = [p for p in model.parameters() if p.requires_grad]
    penalty_grads = torch.autograd.grad(0.5 * total, params)
    assert stack.pop_logs()["reg/l2_sp"] == pytest.approx(total.item(), rel=1e-5)  # the value at these weights
    if form == "penalty":
        expected = [p.grad.double() + e for p, e in zip(params, penalty_grads)]
        stack.before_step()
        actual = [p.grad.double() for p in params]
    else:  # SGD over zero gradients: only the pull moves the weights, by lr * (lambda * gradient)
        expected = [p.detach().double() - 0.1 * e for p, e in zip(params, penalty_grads)]
        opt = torch.optim.SGD(params, lr=0.1)
        stack.attach(model, opt)
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        actual = [p.detach().double() for p in params]
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("anchor_dtype", [None, "bfloat16"])
def test_l2_sp_decoupled_pulls_by_each_groups_lr_before_the_step(anchor_dtype: str | None) -> None:
    model = model_of()
    stack = build("l2_sp", model, strength=2.0, lr=0.1, anchor_dtype=anchor_dtype)
    dtype = torch.bfloat16 if anchor_dtype else torch.float32  # a bf16 anchor is theta_0 rounded
    theta0 = {n: p.detach().to(dtype, copy=True).float() for n, p in model.named_parameters()}
    perturb(model)
    moved = snapshot(model)
    params = dict(model.named_parameters())
    slow = ["model.embed_tokens.weight"]
    groups = [
        {"params": [params[n] for n in slow], "lr": 0.05},
        {"params": [p for n, p in params.items() if n not in slow], "lr": 0.1},
    ]
    opt = torch.optim.SGD(groups, lr=0.1)
    stack.attach(model, opt)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # plain SGD then moves nothing: only the pull does
    opt.step()
    assert stack.pop_logs()["reg/l2_sp"] > 0
    for n, p in params.items():
        lr = 0.05 if n in slow else 0.1
        torch.testing.assert_close(p.detach(), moved[n] - lr * 2.0 * (moved[n] - theta0[n]), atol=1e-7, rtol=0)


def test_l2_sp_decoupled_rejects_an_overshooting_strength() -> None:
    with pytest.raises(ConfigError, match="overshoots"):
        build("l2_sp", model_of(), lr=1e-2, strength=200.0)


@pytest.mark.parametrize("form", ["decoupled", "penalty"])
def test_l2_sp_keeps_weights_closer_to_pretrained(form: str) -> None:
    data = batches_of(rows_of(16, seed=3), 8)
    distances = []
    for strength in (0.0, 20.0):
        torch.manual_seed(0)
        model = model_of()
        theta0 = snapshot(model)
        train(model, build("l2_sp", model, strength=strength, form=form, lr=1e-2), data, steps=12)
        distances.append(sum((p.detach() - theta0[n]).square().sum() for n, p in model.named_parameters()))
    assert distances[1] < 0.7 * distances[0]


def test_l1_pushes_weights_to_zero() -> None:
    data = batches_of(rows_of(16, seed=3), 8)
    fractions = []
    for strength in (0.0, 1.0):
        torch.manual_seed(0)
        model = model_of()
        train(model, build("l1", model, strength=strength), data, steps=6, lr=0.01, sgd=True)
        weights = torch.cat([p.detach().flatten() for _, p in trainable_weights(model)])
        fractions.append((weights.abs() < 0.01).float().mean().item())
    assert fractions[1] > fractions[0] + 0.2


def test_ewc_pulls_high_fisher_entries_more() -> None:
    torch.manual_seed(0)
    model = model_of()
    theta0 = snapshot(model)
    stack = build("ewc", model, batches_of(rows_of(8), 4), strength=5.0, normalize=False)
    reg = stack.items[0][0]
    high = [torch.rand(p.shape) < 0.5 for p in reg.params]  # half of each tensor is important, half is not
    reg.weights = [h.float() * 10.0 for h in high]
    train(model, stack, batches_of(rows_of(16, seed=3), 8), steps=10, lr=0.02, sgd=True)
    moved = [(p.detach() - theta0[n]).abs() for n, p in model.named_parameters()]
    moved_high = torch.cat([m[h] for m, h in zip(moved, high)]).mean()
    moved_low = torch.cat([m[~h] for m, h in zip(moved, high)]).mean()
    assert moved_high < 0.5 * moved_low


def naive_fisher(model: nn.Module, rows: list[dict[str, Any]]) -> list[torch.Tensor]:
    """1/N sum_n grad(l_n)^2, one unpadded row at a time, with the model's own (mean-token) loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = [torch.zeros_like(p) for p in params]
    collate = Collator(0)
    model.eval()
    for row in rows:
        grads = torch.autograd.grad(model(**collate([row])).loss, params, allow_unused=True, materialize_grads=True)
        out = [o + g.square() for o, g in zip(out, grads)]
    return [o / len(rows) for o in out]


@pytest.mark.parametrize(
    ("task", "estimator", "batch"),
    [
        ("causal_lm", "exact", 4),
        ("causal_lm", "empirical", 4),  # a batch's squared summed gradient was 31 % off here (cross terms)
        ("sequence_classification", "exact", 3),
        ("sequence_classification", "empirical", 4),
    ],
)
def test_fisher_normalization_matches_a_per_row_loop(task: str, estimator: str, batch: int) -> None:
    torch.manual_seed(0)
    model = model_of("llama" if task == "causal_lm" else "bert", task)
    rows = rows_of(7, task)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    fisher = estimate_fisher(model, named, batches_of(rows, batch)(), estimator)
    for got, want in zip(fisher, naive_fisher(model, rows)):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-4)


def test_sampled_fisher_estimates_the_true_fisher() -> None:
    """The expectation over labels, computed exactly by enumerating both classes, vs the batched sampled estimate."""
    torch.manual_seed(0)
    model = model_of("bert", "sequence_classification").eval()
    rows = rows_of(6, "sequence_classification")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    true = [torch.zeros_like(p) for p in params]
    collate = Collator(0)
    for row in rows:
        probs = model(**collate([row])).logits.softmax(-1)[0].detach()
        for label in range(2):
            loss = model(**collate([{**row, "labels": label}])).loss
            grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
            true = [t + probs[label] * g.square() / len(rows) for t, g in zip(true, grads)]
    # labels are drawn per batch from its tokens: 40 shuffles make 40 different batchings of the same rows
    shuffles = [[rows[i] for i in torch.randperm(len(rows))] for _ in range(40)]
    sampled = estimate_fisher(model, named, (b for order in shuffles for b in batches_of(order, 3)()), "sampled")
    ratio = sum(f.sum() for f in sampled) / sum(t.sum() for t in true)
    assert 0.8 < ratio < 1.25


def test_fisher_saves_loads_and_combines_online(tmp_path: Path) -> None:
    torch.manual_seed(0)
    refs = batches_of(rows_of(8), 4)
    path = tmp_path / "f" / "fisher.safetensors"
    first = build("ewc", model_of(), refs, save_path=str(path)).items[0][0]
    loaded = build("ewc", model_of(), None, fisher_path=str(path), normalize=False).items[0][0]
    for a, b in zip(first.fisher, loaded.weights):
        torch.testing.assert_close(a, b)
    online = build("ewc", model_of(), refs, fisher_path=str(path), online=True, decay=0.5).items[0][0]
    for a, b in zip(first.fisher, online.fisher):
        torch.testing.assert_close(b, 1.5 * a)


def test_fisher_for_another_model_is_a_clear_error(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    path = tmp_path / "fisher.safetensors"
    build("ewc", model_of(hidden=16), batches_of(rows_of(4), 4), save_path=str(path))
    with pytest.raises(ConfigError, match="shape .* in the file but"):
        build("ewc", model_of(hidden=32), None, fisher_path=str(path))
    lora = get_peft_model(model_of(), LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    with pytest.raises(ConfigError, match="does not match this model's trainable parameters"):
        build("ewc", lora, None, fisher_path=str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        build("ewc", model_of(), None, fisher_path=str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize("name", ["ewc", "si"])
def test_importance_needs_reference_data(name: str) -> None:
    with pytest.raises(ConfigError, match=r"data\.reference"):
        build(name, model_of(), None)


def test_si_importance_matches_a_naive_loop_and_costs_a_few_steps() -> None:
    torch.manual_seed(0)
    model, lr, steps = model_of(), 0.05, 3
    refs = batches_of(rows_of(24), 4)
    theta0 = snapshot(model)
    forwards = []
    handle = model.register_forward_hook(lambda *_: forwards.append(1))
    reg = build("si", model, refs, lr=lr, steps=steps, damping=1e-3).items[0][0]
    handle.remove()
    assert len(forwards) == steps  # ewc would forward all 6 reference batches
    for n, p in model.named_parameters():
        assert torch.equal(p, theta0[n])  # the setup pass is undone exactly
    params = list(model.parameters())
    omega = [torch.zeros_like(p) for p in params]
    model.eval()
    for batch in list(refs())[:steps]:
        grads = torch.autograd.grad(model(**batch).loss, params)
        with torch.no_grad():
            for p, o, g in zip(params, omega, grads):
                o += -g * (-lr * g)  # -g * delta theta
                p -= lr * g
    for p, o, w, n in zip(params, omega, reg.weights, [n for n, _ in model.named_parameters()]):
        raw = o / ((p.detach() - theta0[n]) ** 2 + 1e-3)
        torch.testing.assert_close(w, raw / raw.mean(), rtol=1e-4, atol=1e-6)


def test_llrd_scales_by_depth() -> None:
    model = model_of()
    stack = build("llrd", model, decay=0.5)
    scale = {id(p): g["lr_scale"] for g in stack.param_groups(model) for p in g["params"]}
    params = dict(model.named_parameters())
    assert scale[id(params["model.embed_tokens.weight"])] == 0.125
    assert scale[id(params["model.layers.0.self_attn.q_proj.weight"])] == 0.25
    assert scale[id(params["model.layers.1.mlp.up_proj.weight"])] == 0.5
    assert scale[id(params["model.norm.weight"])] == scale[id(params["lm_head.weight"])] == 1.0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_llrd_finds_the_blocks_of_every_architecture(arch: str) -> None:
    task = "sequence_classification" if arch in ENCODER_ONLY else "causal_lm"
    model = model_of(arch, task)
    depth, head = depths(model)
    embeddings = [p for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()]
    assert embeddings and all(depth[id(p)] == 0 for p in embeddings)
    assert sorted(set(depth.values())) == [0, 1, 2, 3] and head == 3


def test_llrd_composes_with_weight_decay_in_any_order() -> None:
    model = model_of()
    settings = []
    for names in (("llrd", "weight_decay"), ("weight_decay", "llrd")):
        configs = [REGISTRY[n].config(name=n, **({"decay": 0.8} if n == "llrd" else {"strength": 0.1})) for n in names]
        stack = RegularizerStack.from_configs(configs)
        stack.setup(SetupContext(model))
        groups = stack.param_groups(model)
        settings.append({id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]})
    assert settings[0] == settings[1]
    assert {wd for _, wd in settings[0].values()} == {0.0, 0.1}


def test_llrd_under_lora_and_its_errors() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model_of(), LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    stack = build("llrd", model, decay=0.5)
    scales = {}
    for g in stack.param_groups(model):
        for p in g["params"]:
            scales[id(p)] = g["lr_scale"]
    named = dict(model.named_parameters())
    assert all(id(p) in scales for p in model.parameters() if p.requires_grad)
    assert scales[id(named["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"])] == 0.25
    assert scales[id(named["base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight"])] == 0.5
    with pytest.raises(ConfigError, match="no nn.ModuleList"):
        build("llrd", nn.Sequential(nn.Linear(2, 2)))
    from tether.config import RegularizerEntry
    from tether.regularizers import parse_entries

    with pytest.raises(ConfigError, match="strength is unused"):
        parse_entries([RegularizerEntry(name="llrd", strength=0.1)])


@pytest.mark.parametrize("name", [*QUADRATIC, "llrd", "weight_decay"])
def test_frozen_params_are_never_penalized_nor_given_optimizer_state(name: str) -> None:
    torch.manual_seed(0)
    model = model_of()
    frozen = model.model.embed_tokens.weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    stack = build(name, model, batches_of(rows_of(8), 4), strength=0.0 if name == "llrd" else 0.5)
    opt = train(model, stack, batches_of(rows_of(8, seed=2), 4), steps=3)
    assert torch.equal(frozen, before) and frozen.grad is None and frozen not in opt.state
    assert all(frozen is not p for g in opt.param_groups for p in g["params"])
    stack.pop_logs()
    seed_grads(model)
    stack.before_step()
    assert frozen.grad is None  # the pulls add to existing gradients only
    value = stack.pop_logs().get(f"reg/{name}")
    with torch.no_grad():
        frozen.add_(1.0)
    assert stack.pop_logs().get(f"reg/{name}") == value  # the frozen tensor is not in the value either


@pytest.mark.parametrize("name", ["l2_sp", "ewc"])
def test_gradient_accumulation_counts_the_penalty_once_per_step(name: str, tmp_path: Path) -> None:
    from transformers import TrainingArguments

    from tether.trainer import RegularizedTrainer

    rows = rows_of(16, seed=5)
    fields = {"form": "penalty"} if name == "l2_sp" else {"normalize": False}
    results = []
    for batch, accumulate, strength in ((8, 1, 3.0), (2, 4, 3.0), (8, 1, 0.0)):
        model = model_of(seed=0)
        args = TrainingArguments(
            output_dir=str(tmp_path / f"{batch}-{strength}"), use_cpu=True, report_to="none", max_steps=4,
            per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate, learning_rate=0.5,
            optim="sgd", lr_scheduler_type="constant", seed=0, save_strategy="no", disable_tqdm=True,
            dataloader_pin_memory=False,
        )  # fmt: skip
        stack = RegularizerStack.from_configs([REGISTRY[name].config(name=name, strength=strength, **fields)])
        trainer = RegularizedTrainer(
            model=model, args=args, train_dataset=rows, data_collator=Collator(0), stack=stack
        )
        stack.setup(SetupContext(trainer.model, batches_of(rows_of(8), 4), args.learning_rate))
        trainer.train()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=1e-4)
    assert (results[0] - results[2]).abs().max() > 1e-3  # the penalty did change the weights


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", QUADRATIC)
def test_fp64_weights_keep_fp64_differences_and_values(name: str, path: str) -> None:
    """fp64 weights moved by 1e-9: an fp32 theta - theta_0 rounds that away, and the fp32 norm of the value crashed."""
    torch.manual_seed(0)
    model = model_of().double()
    theta0 = snapshot(model)
    stack = build(
        name, model, batches_of(rows_of(8), 4), strength=1.0, **({"form": "penalty"} if name == "l2_sp" else {})
    )
    if path == "fused_lists":
        use_fused_lists(stack)
    perturb(model, size=1e-9)
    seed_grads(model)
    params = [p for p in model.parameters() if p.requires_grad]
    expected = [p.grad + e for p, e in zip(params, naive_pull(name, stack, model, theta0))]
    exact = reference_value(name, stack, model, theta0)
    stack.before_step()
    assert stack.pop_logs()[f"reg/{name}"] == pytest.approx(exact.item(), rel=1e-9)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, atol=1e-15, rtol=1e-12)


def test_si_gives_zero_importance_where_the_gradient_is_zero_in_exact_arithmetic() -> None:
    """BERT's key biases shift every attention score of a query alike, which softmax ignores: their gradient is 0 in
    exact arithmetic and fp32 rounding noise in practice. Normalized to mean 1, that noise was held like the head."""
    torch.manual_seed(0)
    model = model_of("bert", "sequence_classification")
    reg = build("si", model, batches_of(rows_of(8, "sequence_classification"), 4)).items[0][0]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    means = {n: w.mean().item() for n, w in zip(names, reg.weights)}
    key_biases = [n for n in names if n.endswith("attention.self.key.bias")]
    assert key_biases and all(means[n] == 0 for n in key_biases)
    assert all(means[n] == pytest.approx(1.0, rel=1e-5) for n in names if n not in key_biases)
