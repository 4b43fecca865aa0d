"""SI-style importance: lambda/2 * sum Omega * (theta - theta_0)^2, Omega from a short training pass at setup.

Element-wise (Synaptic Intelligence, Zenke et al., 2017): `steps` plain SGD steps at the run's learning rate on the
first reference batches (true labels, eval mode) accumulate the path integral omega = sum_k -g_k * dtheta_k
(= lr * sum_k g_k^2 for SGD), and the importance is omega / ((theta_K - theta_0)^2 + damping). The weights are then
restored exactly: the model leaves setup as it came in. With fine-tuning learning rates the path is short, the damping
dominates the denominator, and Omega is close to the sum of squared gradients along the path: a cheap Fisher proxy
from a few batches (compare ewc, which passes over all the reference data).

Layer-wise (the hierarchy of arXiv 2501.13669): Omega is divided by its mean within each parameter tensor, so every
tensor is held equally hard on average (lambda means the same for every layer and model, and the embeddings or the
head, whose gradients are largest, do not take over), and within a tensor the important entries are held harder.
Only trainable tensors take part (the adapters and head under LoRA). Under FSDP2 the anchor and Omega are sharded
like the parameters (the setup steps' gradients are identical on every process, which runs the same batches) and
each tensor's mean is taken over all of its shards. A tensor whose gradients were only rounding noise (its mean
importance at most (fp32 eps)^2 times the median tensor's, see noise_floor) gets zero importance.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from itertools import cycle, islice

import torch
from pydantic import Field
from torch import nn

from tether.errors import ConfigError
from tether.regularizers.anchor import (
    add_pull,
    differences,
    global_sums,
    loss_gradients,
    quadratic_value,
    scratch,
    scratch_bytes,
    shards,
    snapshot,
    trainable,
)
from tether.regularizers.base import Regularizer, RegularizerConfig, RunFacts, SetupContext, nbytes, register
from tether.regularizers.ewc import Batch, model_inputs


class SIConfig(RegularizerConfig):
    strength: float = Field(0.3, ge=0)
    """lambda; Omega has mean 1 in every tensor: 0.1-1 (the scale of ewc with normalize)."""
    steps: int = Field(4, ge=1)
    """SGD steps of the setup pass, one reference batch each (cycled when there are fewer)."""
    damping: float = Field(1e-3, gt=0)
    """xi in omega / ((theta_K - theta_0)^2 + xi): keeps Omega finite where a weight did not move."""

    def without_reference_data(self) -> str | None:
        return "si measures importance on the reference data: set data.reference"

    def check_run(self, run: RunFacts) -> str | None:
        if not run.learning_rate > 0:
            return "si takes its setup steps at the training learning rate: set training.learning_rate > 0"
        return super().check_run(run)


@register("si", SIConfig)
class SI(Regularizer):
    touches_parameters = True

    def __init__(self, config: SIConfig) -> None:
        self.config = config
        self.params: list[torch.Tensor] = []
        self.anchors: list[torch.Tensor] = []
        self.views: list[torch.Tensor] | None = None
        self.weights: list[torch.Tensor] = []
        """Omega, the per-entry weights of the penalty (fp32, mean 1 in every tensor, 0 where gradients were noise)."""

    def setup(self, ctx: SetupContext) -> None:
        self.params = [p for _, p in trainable(ctx.model, ctx.new_parameters)]
        self.anchors = snapshot(self.params)
        # every process takes the same steps on the same batches: the importance must be identical everywhere
        batches = list(islice(ctx.reference_batches(shard=False), self.config.steps))
        if not batches:
            raise ConfigError("si: the reference data yielded no batch: check data.reference")
        try:
            omega = path_integral(ctx.model, self.params, islice(cycle(batches), self.config.steps), ctx.learning_rate)
            with torch.no_grad():
                moved = differences(shards(self.params), self.anchors)
        finally:
            with torch.no_grad():
                torch._foreach_copy_(shards(self.params), self.anchors)  # leave the model as it came in
        importance = importance_from_path(omega, moved, self.config.damping)
        self.views = scratch(self.params)
        sums = global_sums(importance, self.params)  # each tensor's mean, over all of its shards
        means = (sums / sums.new_tensor([p.numel() for p in self.params])).tolist()
        self.weights = [w.div_(m) if m > noise_floor(means) else w.zero_() for w, m in zip(importance, means)]

    def memory(self) -> dict[str, int]:
        held = nbytes(self.anchors), nbytes(self.weights), scratch_bytes(self.views)
        return dict(zip(("anchor", "importance", "work buffer"), held))

    def penalty_grad(self, scale: float) -> None:
        add_pull(self.params, self.anchors, self.weights, scale, self.views)

    def penalty_value(self) -> torch.Tensor | None:
        return quadratic_value(self.params, self.anchors, self.weights) if self.params else None


def path_integral(
    model: nn.Module, params: list[torch.Tensor], batches: Iterable[Batch], lr: float
) -> list[torch.Tensor]:
    """sum_k -g_k * dtheta_k over plain SGD steps (theta <- theta - lr * g) on `batches`, in fp32; moves the model."""
    omega = [torch.zeros_like(p, dtype=torch.float32) for p in shards(params)]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            loss = model(**model_inputs(batch), labels=batch["labels"]).loss
            grads = loss_gradients(model, loss, params)
            with torch.no_grad():
                torch._foreach_add_(shards(params), grads, alpha=-lr)
                torch._foreach_addcmul_(omega, grads, grads, value=lr)  # -g * dtheta = lr * g^2
    finally:
        model.train(was_training)
    return omega


def noise_floor(means: list[float]) -> float:
    """Tensor means at or below this are rounding noise, not importance: (fp32 eps)^2 times the median tensor's. A
    tensor whose gradient is zero in exact arithmetic (BERT's key biases: softmax ignores a shift of all scores)
    still gets ~1e-14 from fp32 sums, about eps^2 of its neighbours' importance (1e-22 of the median on a tiny BERT,
    where the smallest real one is 2e-9); normalized to mean 1 it would be held like any other tensor."""
    return torch.finfo(torch.float32).eps ** 2 * statistics.median(means) if means else 0.0


def importance_from_path(omega: list[torch.Tensor], moved: list[torch.Tensor], damping: float) -> list[torch.Tensor]:
    """Element-wise SI importance omega / (total change^2 + damping)."""
    return torch._foreach_div(omega, torch._foreach_add(torch._foreach_mul(moved, moved), damping))
