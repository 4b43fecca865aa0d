"""dft, eaft, flow, asft: the training step's loss (tether.step.shaped_forward, the model's cross-entropy computed
once by the stack, each token weighted) equals the published reweighted cross-entropy computed naively, token by
token (value and gradient), at strength 1 and as a mix in between; and they change what training learns."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from tests.test_reference_regularizers import VOCAB, batch_of, model_of
from tether.data import IGNORE, Collator
from tether.regularizers import REGISTRY, RegularizerStack, SetupContext
from tether.step import regularized_loss, shaped_forward


def stack_of(model: nn.Module, entry: dict) -> RegularizerStack:
    stack = RegularizerStack.from_configs([REGISTRY[entry["name"]].config(**entry)])
    stack.setup(SetupContext(model, None, 1e-2))
    return stack


def naive_tokens(logits: torch.Tensor, labels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, label) of every loss token, one at a time (causal LM: logits at t against the label at t + 1)."""
    out = []
    for b in range(labels.shape[0]):
        if labels.ndim == 1:
            out.append((logits[b], labels[b]))
            continue
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] != IGNORE:
                out.append((logits[b, t], labels[b, t + 1]))
    return out


def dft_weight(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.softmax(z.double(), -1)[y]


def eaft_weight(z: torch.Tensor, y: torch.Tensor, k: int = 5) -> torch.Tensor:
    k = min(k, len(z))  # two classes: the entropy of both, over log 2
    top = sorted(z.double().tolist(), reverse=True)[:k]
    p = [math.exp(v) / sum(math.exp(u) for u in top) for v in top]
    return torch.tensor(-sum(q * math.log(q) for q in p) / math.log(k), dtype=torch.float64)


def naive_loss(logits: torch.Tensor, labels: torch.Tensor, weight, strength: float) -> torch.Tensor:
    """mean over tokens of ((1 - s) + s * sg(w)) * NLL, in fp64, a token at a time."""
    terms = []
    for z, y in naive_tokens(logits, labels):
        nll = -torch.log_softmax(z.double(), -1)[y]
        w = weight(z.detach(), y)
        terms.append(((1 - strength) + strength * w) * nll)
    return torch.stack(terms).mean()


CASES = [("dft", dft_weight, {}), ("eaft", eaft_weight, {"top_k": 5})]


@pytest.mark.parametrize("task", ["causal_lm", "sequence_classification"])
@pytest.mark.parametrize("strength", [1.0, 0.4])
@pytest.mark.parametrize(("name", "weight", "fields"), CASES, ids=[c[0] for c in CASES])
def test_the_loss_is_the_reweighted_cross_entropy(name, weight, fields, strength, task):
    model = model_of(task=task)
    batch = batch_of(4, task=task)
    if task == "causal_lm":
        batch["labels"][1, 6:] = IGNORE  # an ignored tail: those positions carry no loss
    stack = stack_of(model, {"name": name, "strength": strength, **fields})
    total, out = shaped_forward(stack, model, batch)  # the stack weighs by strength
    want = naive_loss(out.logits, batch["labels"], weight, strength)
    torch.testing.assert_close(total.double(), want, rtol=1e-5, atol=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
    ref = torch.autograd.grad(want, params, allow_unused=True)
    for g, w in zip(got, ref):
        if w is not None:
            torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-6)


def test_dft_keeps_unlikely_tokens_from_dominating():
    """DFT's point: a token the model finds unlikely pulls the weights far less than under plain cross-entropy."""
    model = model_of()
    batch = batch_of(1)
    out = model(**batch)
    plain = torch.autograd.grad(out.loss, model.lm_head.weight, retain_graph=True)[0].norm()
    stack = stack_of(model, {"name": "dft", "strength": 1.0})
    shaped = torch.autograd.grad(shaped_forward(stack, model, batch)[0], model.lm_head.weight)[0].norm()
    assert shaped < 0.2 * plain  # p(label) ~ 1/VOCAB for an untrained model: the gradient shrinks by about that
    assert VOCAB > 5


def test_eaft_weights_are_entropy_normalized():
    from tether.regularizers.eaft import top_k_entropy

    z = torch.tensor([[0.0] * 8, [50.0] + [0.0] * 7])
    w = top_k_entropy(z, 4)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.0]), atol=1e-6, rtol=0)  # uniform top-4: 1; one-hot: 0


# ---------------------------------------------------------------------------------------------------------------
# flow: row weights from the original model's loss


def rows_of(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ids = [rng.randrange(4, VOCAB) for _ in range(rng.randint(5, 10))]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE] * 2 + ids[2:]})
    return rows


def naive_row_weights(model: nn.Module, rows: list[dict], tau: float | None) -> list[float]:
    """exp(-L_i / tau) normalized to mean 1, L_i each row's mean token loss, one row at a time, in fp64."""
    losses = []
    with torch.no_grad():
        for row in rows:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0].double()
            terms = [
                -torch.log_softmax(logits[t], -1)[row["labels"][t + 1]]
                for t in range(len(row["input_ids"]) - 1)
                if row["labels"][t + 1] != IGNORE
            ]
            losses.append(float(torch.stack(terms).mean()))
    tau = tau or sorted(losses)[(len(losses) - 1) // 2]  # torch's median: the lower middle value
    w = [math.exp(-loss / tau) for loss in losses]
    return [x * len(w) / sum(w) for x in w]


@pytest.mark.parametrize("tau", [None, 0.5])
@pytest.mark.parametrize("strength", [1.0, 0.4])
def test_flow_is_the_row_weighted_cross_entropy(strength, tau):
    model = model_of()
    rows = rows_of(6, seed=1)
    stack = RegularizerStack.from_configs([REGISTRY["flow"].config(name="flow", strength=strength, temperature=tau)])
    assert stack.train_data(rows, None, 0) == rows  # the rows are weighed, not changed
    stack.setup(SetupContext(model, None, 1e-2))
    weights = naive_row_weights(model, rows, tau)
    batch = Collator(0)(rows[1:5])  # a batch in another order and padding than at setup
    total, out = shaped_forward(stack, model, batch)
    terms = []
    for (z, y), b in zip(naive_tokens(out.logits, batch["labels"]), token_rows(batch["labels"])):
        nll = -torch.log_softmax(z.double(), -1)[y]
        terms.append(((1 - strength) + strength * weights[1 + b]) * nll)
    want = torch.stack(terms).mean()
    torch.testing.assert_close(total.double(), want, rtol=1e-5, atol=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    for g, w in zip(torch.autograd.grad(total, params, retain_graph=True), torch.autograd.grad(want, params)):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-6)


def token_rows(labels: torch.Tensor) -> list[int]:
    """The row of each loss token, in naive_tokens' order."""
    return [b for b in range(labels.shape[0]) for t in range(labels.shape[1] - 1) if labels[b, t + 1] != IGNORE]


def test_flow_refuses_rows_it_did_not_weigh():
    from tether.errors import ConfigError

    model = model_of()
    stack = RegularizerStack.from_configs([REGISTRY["flow"].config(name="flow")])
    with pytest.raises(ConfigError, match="flow weighs the training rows"):
        stack.setup(SetupContext(model, None, 1e-2))
    stack.train_data(rows_of(4, seed=1), None, 0)
    stack.setup(SetupContext(model, None, 1e-2))
    batch = Collator(0)(rows_of(2, seed=9))
    with pytest.raises(ConfigError, match="a row it did not weigh at setup"):
        shaped_forward(stack, model, batch)


def step_loss(stack: RegularizerStack, model: nn.Module, batch: dict) -> torch.Tensor:
    """Steps 2-3 of tether.step: the shaped task loss plus the weighted penalties."""
    task_loss, outputs = shaped_forward(stack, model, batch)
    return regularized_loss(stack, model, batch, outputs, task_loss)


@pytest.mark.parametrize("task", ["causal_lm", "sequence_classification"])
def test_asft_is_dft_plus_the_kl_anchor(task):
    """asft's loss is dft's plus anchor times kl's, on the same batch, each against a frozen copy of the model as it
    was at setup (then moved, so that the KL is not zero); its reg/asft log is the sum of both terms."""
    model = model_of(task=task)
    batch = batch_of(4, task=task)
    entries = [{"name": "asft", "anchor": 0.3}, {"name": "dft"}, {"name": "kl", "strength": 1.0}]
    stacks = []
    for entry in entries:
        stack = RegularizerStack.from_configs([REGISTRY[entry["name"]].config(**entry)])
        stack.setup(SetupContext(model, None, 1e-2))
        stacks.append(stack)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = model(**batch)
    kl = stacks[2].penalty(model, batch, out)
    asft, dft = (step_loss(stack, model, batch) for stack in stacks[:2])
    assert kl > 1e-4
    torch.testing.assert_close(asft, dft + 0.3 * kl)
    logs = {k: v for stack in stacks for k, v in stack.pop_logs().items()}
    assert logs["reg/asft"] == pytest.approx(logs["reg/dft"] + 0.3 * logs["reg/kl"], rel=1e-5)


@pytest.mark.parametrize("task", ["causal_lm", "sequence_classification"])
def test_the_shaped_loss_at_strength_0_is_the_models_own(task):
    """The stack's one cross-entropy pass replaces the model's: unweighted, it is the model's loss and gradient."""
    model = model_of(task=task)
    batch = batch_of(4, task=task)
    own = model(**batch).loss
    shaped, _ = shaped_forward(stack_of(model, {"name": "dft", "strength": 0.0}), model, batch)
    torch.testing.assert_close(shaped, own)
    params = [p for p in model.parameters() if p.requires_grad]
    for g, w in zip(torch.autograd.grad(shaped, params), torch.autograd.grad(own, params)):
        torch.testing.assert_close(g, w)


def test_flow_weighs_the_rows_replay_mixes_in_wherever_it_is_listed():
    """The stack gives flow (Regularizer.reads_rows) the rows after replay's even when flow is listed first: before,
    a batch of replayed rows stopped the run at its first step."""
    model = model_of()
    train, reference = rows_of(8, seed=1), rows_of(8, seed=2)
    entries = [{"name": "flow"}, {"name": "replay", "ratio": 0.5}]
    stack = RegularizerStack.from_configs([REGISTRY[e["name"]].config(**e) for e in entries])
    rows = stack.train_data(train, reference, 0)
    mixed = [row for row in rows if row not in train]
    assert mixed
    stack.setup(SetupContext(model, None, 1e-2))
    loss, _ = shaped_forward(stack, model, Collator(0)(mixed))
    assert torch.isfinite(loss)
