"""The two foundation regularizers against naive references: l2 (value, gradient) and weight_decay (grouping)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tether.config import RegularizerEntry
from tether.regularizers import RegularizerStack, SetupContext, parse_entries
from tether.synthetic import tiny_model


def _stack(model: nn.Module, *entries: dict) -> RegularizerStack:
    stack = RegularizerStack.from_configs(parse_entries([RegularizerEntry(**e) for e in entries]))
    stack.setup(SetupContext(model))
    return stack


def _model(arch: str = "llama", dtype: torch.dtype = torch.float32) -> nn.Module:
    task = "sequence_classification" if arch in ("bert", "roberta") else "causal_lm"
    return tiny_model(arch, task, 64, hidden_size=16, num_layers=2, num_heads=2, seed=0).to(dtype)


def _naive_l2(model: nn.Module) -> torch.Tensor:
    """lambda-free 1/2 * sum of squares over weights, written plainly with autograd."""
    total = torch.zeros((), dtype=torch.float64)
    for name, p in model.named_parameters():
        owner = model.get_submodule(name.rpartition(".")[0])
        if p.ndim >= 2 and not name.endswith("bias") and "norm" not in type(owner).__name__.lower():
            total = total + 0.5 * (p.double() ** 2).sum()
    return total


def test_l2_value_and_gradient_match_naive_reference():
    torch.manual_seed(0)
    model, ref = _model(), _model()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    for p, q in zip(model.parameters(), ref.parameters()):
        q.grad = p.grad.clone()
    lam = 0.37
    stack = _stack(model, {"name": "l2", "strength": lam})
    stack.before_step()
    naive = _naive_l2(ref)
    (lam * naive).backward()
    logged = stack.pop_logs()["reg/l2"]
    assert logged == pytest.approx(naive.item(), rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_l2_in_bf16_keeps_the_penalty():
    model = _model(dtype=torch.bfloat16)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    stack = _stack(model, {"name": "l2", "strength": 1.0})
    stack.before_step()
    exact = _naive_l2(_model(dtype=torch.bfloat16)).item()
    assert stack.pop_logs()["reg/l2"] == pytest.approx(exact, rel=1e-4)


def test_l2_shrinks_weights_compared_to_none():
    """Behaviour: with a zero task gradient and SGD, l2 shrinks exactly the penalized weights."""
    norms = {}
    for strength in (0.0, 0.5):
        model = _model()
        stack = _stack(model, {"name": "l2", "strength": strength})
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        stack.attach(model, opt)
        for _ in range(5):
            opt.zero_grad(set_to_none=False)
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            opt.step()
        norms[strength] = {n: p.norm().item() for n, p in model.named_parameters()}
    shrunk = [n for n in norms[0.0] if norms[0.5][n] < norms[0.0][n] - 1e-6]
    assert shrunk and all("norm" not in n and not n.endswith("bias") for n in shrunk)
    assert any("embed" in n for n in shrunk)


class MyRMSNorm(nn.Module):
    """A custom norm class, recognized by its name alone."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.gain2d = nn.Parameter(torch.ones(1, d))  # 2-D on purpose: only the class name marks it


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_weight_decay_groups_exempt_biases_and_norms(arch):
    model = _model(arch)
    model.extra_norm = MyRMSNorm(16)
    stack = _stack(model, {"name": "weight_decay", "strength": 0.1})
    groups = stack.param_groups(model)
    by_id = {id(p): n for n, p in model.named_parameters()}
    decayed = {by_id[id(p)] for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    exempt = {by_id[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decayed.isdisjoint(exempt)
    assert decayed | exempt == {n for n, p in model.named_parameters() if p.requires_grad}
    assert "extra_norm.gain2d" in exempt and "extra_norm.weight" in exempt
    assert not any(n.endswith("bias") for n in decayed)
    norm_params = [n for n in exempt if "norm" in n.lower() or "ln" in n.split(".")[-2]]
    assert norm_params, f"no norm parameter found exempt in {arch}"
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed)


def test_mambas_log_decay_rates_are_not_decayed():
    from tests.archs import tiny

    model = tiny("mamba")
    groups = _stack(model, {"name": "weight_decay", "strength": 0.1}).param_groups(model)
    by_id = {id(p): n for n, p in model.named_parameters()}
    decayed = {by_id[id(p)] for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    a_log = [n for n in by_id.values() if n.endswith("A_log")]
    assert a_log and not decayed.intersection(a_log)
    assert any(n.endswith("in_proj.weight") for n in decayed)


def test_weight_decay_behaviour_decays_only_decayed_group():
    model = _model()
    stack = _stack(model, {"name": "weight_decay", "strength": 0.5})
    opt = torch.optim.AdamW(stack.param_groups(model), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        expected = before[n] * (1 - 0.1 * 0.5) if p.ndim >= 2 and "norm" not in n else before[n]
        torch.testing.assert_close(p.detach(), expected, msg=n)


def test_frozen_parameters_are_never_penalized_or_grouped():
    model = _model()
    frozen = model.get_input_embeddings().weight
    frozen.requires_grad_(False)
    stack = _stack(model, {"name": "weight_decay", "strength": 0.1}, {"name": "l2", "strength": 1.0})
    assert all(p is not frozen for g in stack.param_groups(model) for p in g["params"])
    for p in model.parameters():
        p.grad = None if p is frozen else torch.zeros_like(p)
    stack.before_step()
    assert frozen.grad is None
