"""The memory estimate printed before training counts the model, its optimizer state and what regularizers hold."""

from __future__ import annotations

from tests.test_param_regularizers import batches_of, model_of, rows_of
from tether.regularizers import REGISTRY, RegularizerStack, SetupContext
from tether.run import memory_estimate


def _stack(model, *configs):
    stack = RegularizerStack.from_configs([REGISTRY[c["name"]].config(**c) for c in configs])
    stack.setup(SetupContext(model, batches_of(rows_of(4), 2), 1e-3))
    return stack


def test_estimate_counts_anchors_fisher_and_the_reference_copy():
    model = model_of()
    n = sum(p.numel() for p in model.parameters())  # all trainable, fp32
    stack = _stack(
        model,
        {"name": "l2_sp", "strength": 1.0, "anchor_dtype": "bfloat16"},
        {"name": "ewc", "strength": 1.0},
        {"name": "distill", "strength": 1.0, "reference": {"dtype": "bfloat16"}},
    )
    est = memory_estimate(model, stack)
    assert est["model weights"] == est["gradients"] == 4 * n
    assert est["optimizer state (Adam moments)"] == 8 * n
    assert est["l2_sp: anchor"] == 2 * n  # bf16 anchor
    assert est["ewc: anchor"] == est["ewc: Fisher"] == 4 * n
    largest = max(p.numel() * 4 for p in model.parameters())
    assert est["ewc: work buffer"] == largest  # one fp32 tensor as large as the largest, CPU only (anchor.scratch)
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    assert est["reference: frozen copy"] == sum(t.numel() * (2 if t.is_floating_point() else t.element_size())
                                                for t in tensors)  # fmt: skip


def test_frozen_parameters_are_not_counted_as_trained():
    model = model_of()
    for name, p in model.named_parameters():
        p.requires_grad_("lm_head" in name)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    est = memory_estimate(model, _stack(model, {"name": "ema", "decay": 0.9}))
    assert est["gradients"] == 4 * trained and est["optimizer state (Adam moments)"] == 8 * trained
    assert est["ema: average"] == 4 * trained
