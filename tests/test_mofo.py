"""mofo: Adam whose update reaches only the top-α entries of each tensor by |momentum|, checked against Adam written
out by hand; what it changes in training; what it refuses."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tether.errors import ConfigError
from tether.regularizers import REGISTRY, RegularizerStack, SetupContext
from tether.regularizers.mofo import SMALL, top_fraction

LR, BETAS, EPS = 1e-2, (0.9, 0.999), 1e-8


def model_and_batches(seed: int = 0) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 800), nn.Tanh(), nn.Linear(800, 3))  # 800 x 6 is past SMALL: the histogram
    batches = [(torch.randn(5, 6), torch.randn(5, 3)) for _ in range(4)]
    return model, batches


def loss_of(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def with_mofo(fraction: float, optimizer_cls=torch.optim.AdamW, **opt_kwargs) -> nn.Module:
    model, batches = model_and_batches()
    stack = RegularizerStack.from_configs([REGISTRY["mofo"].config(name="mofo", fraction=fraction)])
    stack.setup(SetupContext(model, None, LR))
    optimizer = optimizer_cls(model.parameters(), lr=LR, **opt_kwargs)
    stack.attach(model, optimizer)
    for batch in batches:
        optimizer.zero_grad()
        loss_of(model, batch).backward()
        optimizer.step()
    return model


def by_hand(fraction: float) -> nn.Module:
    """Adam (no decay) with full moment updates, the update applied to the k largest |m| entries of each tensor."""
    model, batches = model_and_batches()
    params = list(model.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, batch in enumerate(batches, start=1):
        grads = torch.autograd.grad(loss_of(model, batch), params)
        with torch.no_grad():
            for p, g, m_i, v_i in zip(params, grads, m, v):
                m_i.mul_(BETAS[0]).add_(g, alpha=1 - BETAS[0])
                v_i.mul_(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
                update = (m_i / (1 - BETAS[0] ** t)) / ((v_i / (1 - BETAS[1] ** t)).sqrt() + EPS)
                k = math.ceil(fraction * p.numel())
                chosen = torch.zeros(p.numel(), dtype=torch.bool)
                chosen[m_i.abs().reshape(-1).argsort(descending=True)[:k]] = True
                p.sub_(LR * update * chosen.reshape(p.shape))
    return model


@pytest.mark.parametrize("fraction", [0.1, 0.3, 1.0])
def test_mofo_is_adam_updating_the_top_momentum_entries(fraction):
    got, want = with_mofo(fraction, weight_decay=0.0), by_hand(fraction)
    for (name, a), b in zip(got.named_parameters(), want.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def large_momenta(dtype: torch.dtype, fraction: float) -> dict[str, torch.Tensor]:
    """Tensors past SMALL (where the histogram select runs), shaped like what Adam's momentum can hold, and one
    whose k-th largest entry is the largest of its histogram bin."""
    gen = torch.Generator().manual_seed(0)
    n = 7 * (SMALL // 2 + 1)  # past SMALL, odd sizes
    edge = torch.ones(n)
    edge[: math.ceil(fraction * n) - 1] = 4.0

    def randn() -> torch.Tensor:
        return torch.randn(n, generator=gen)

    cases = {
        "normal": randn() * 1e-3,
        "heavy tails": randn() * torch.rand(n, generator=gen).pow(8),
        "mostly zero (unseen embedding rows)": randn() * (torch.rand(n, generator=gen) < 0.05),
        "ties": torch.randint(-3, 4, (n,), generator=gen).float(),
        "all in one bin": 1 + torch.rand(n, generator=gen) * 1e-3,
        "subnormal": randn() * 1e-40,
        "k-th largest at a bin's top": edge,
    }
    return {name: m.to(dtype).reshape(-1, 7) if name == "normal" else m.to(dtype) for name, m in cases.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5])
def test_top_fraction_is_the_k_largest_and_their_ties(dtype, fraction):
    for name, m in large_momenta(dtype, fraction).items():
        magnitude = m.abs()
        k = math.ceil(fraction * m.numel())
        want = magnitude >= magnitude.reshape(-1).sort(descending=True).values[k - 1]
        assert torch.equal(top_fraction(m, fraction), want), name


def test_mofo_moves_only_its_share_of_each_tensor():
    start, _ = model_and_batches()
    plain, moved = with_mofo(1.0), with_mofo(0.1)
    for p0, p1, p2 in zip(start.parameters(), plain.parameters(), moved.parameters()):
        share = (p2 != p0).float().mean().item()
        assert (p1 != p0).float().mean().item() > 0.9  # plain Adam moves (almost) everything
        assert share <= min(1.0, 4 * math.ceil(0.1 * p0.numel()) / p0.numel())  # at most k entries per step, 4 steps


def test_mofo_needs_an_adam_momentum():
    with pytest.raises(ConfigError, match="mofo filters Adam's update by its momentum, and SGD keeps none"):
        with_mofo(0.1, torch.optim.SGD)
