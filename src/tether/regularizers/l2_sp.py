"""L2-SP: pull the weights toward the pre-trained ones, lambda/2 * sum (theta - theta_0)^2 (Li et al., 2018).

theta_0 is every trainable tensor as it is at setup (biases and norms included), kept as detached copies, except
the tensors that loading initialized (a new classification head: SetupContext.new_parameters), which train freely.

Two forms (`form`):
  decoupled  the pull is applied in the update, as AdamW applies its decay, before the optimizer step and so from
             theta_t: theta <- theta - lr * lambda * (theta - theta_0), with each parameter group's current lr
             (so it follows the schedule and LLRD). Adam does not rescale it: lambda means the same for every weight.
  penalty    lambda * (theta - theta_0) is added to the gradients (the gradient of the penalty in the loss), so it
             goes through Adam's normalization like the task gradient.

With LoRA (a PEFT model) the frozen base weights cannot move; what moves is each adapted layer's effective weight,
W + s * B @ A. The pull is then on that change, 1/2 * s^2 * ||B A - B_0 A_0||_F^2 (B_0 = 0 for a fresh adapter, so
this is ||Delta W||^2), not on A and B themselves (A is random and its size says nothing about Delta W). It is
computed from r x r products only: ||B A||^2 = trace((B^T B)(A A^T)), and so are its gradients
s^2 (B A - B_0 A_0) A^T for B and s^2 B^T (B A - B_0 A_0) for A; the d x d matrix is never formed. Each active
adapter of a layer is pulled on its own. Fused MoE experts (one 3-D weight for all of a layer's experts, adapted by
PEFT's ParamWrapper with A: (E r) x in and B: out x (r E)) are pulled per expert, sum_e ||B_e A_e - ...||^2, with
A_e and B_e the expert's rows and columns as PEFT's get_delta_weight takes them: the change of each expert's
matrix, not of one matrix made of all of them (whose cross terms mix experts). Other trainable tensors (a classifier
head, modules_to_save, embedding or conv adapters, DoRA magnitudes) are pulled elementwise toward their values at
setup.

Under FSDP2 the elementwise pull runs on each process's shards. A and B are small (r rows or columns): each pair's
pull gathers them whole (one all-gather of each per pull), and each process applies its shard of the result.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from tether.distributed import full, is_main_process, is_sharded, local, shard_like
from tether.regularizers.anchor import (
    add_pull,
    grad_shards,
    quadratic_value,
    scratch,
    scratch_bytes,
    snapshot,
    trainable,
)
from tether.regularizers.base import Regularizer, RegularizerConfig, RunFacts, SetupContext, nbytes, register

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class L2SPConfig(RegularizerConfig):
    strength: float = Field(10.0, ge=0)
    """lambda; left out, 10 for decoupled and 0.01 for penalty. decoupled: each step removes the fraction lr * lambda
    of the distance to theta_0, so take lr * lambda * steps ~ 2-6 (lr 1e-3, 200 steps: 10-30); penalty: 0.01-0.03."""
    form: Literal["decoupled", "penalty"] = "decoupled"
    """decoupled: applied in the update like AdamW's decay; penalty: its gradient is added to the loss gradient."""
    anchor_dtype: Literal["bfloat16", "float16"] | None = None
    """Keep theta_0 in this lower precision to halve its memory for fp32 training; theta_0 is then rounded
    (relative 4e-3 for bfloat16), so the pull is not exactly zero at the start. None: the parameter's dtype."""

    @model_validator(mode="before")
    @classmethod
    def _default_strength(cls, data: Any) -> Any:
        """The two forms' lambdas differ by ~1000x (Adam normalizes the penalty's gradient), so each has its own."""
        if isinstance(data, dict) and "strength" not in data and data.get("form") == "penalty":
            return {**data, "strength": 0.01}
        return data

    def check_run(self, run: RunFacts) -> str | None:
        lr_lambda = run.learning_rate * self.strength
        if self.form == "decoupled" and lr_lambda >= 1:
            return f"l2_sp.strength: lr * strength = {lr_lambda:g} >= 1 overshoots theta_0 every step: lower strength"
        return None


@dataclass
class LoraGroup:
    """The LoRA adapters of one shape (A: r x in, B: out x r), stacked so that a pull is a few batched products
    whatever the number of layers (one product per layer would be thousands of small kernel launches a step)."""

    a: list[nn.Parameter]
    b: list[nn.Parameter]
    s2: torch.Tensor  # [n]: each adapter's scaling s, squared
    a0: torch.Tensor  # [n, r, in], fp32, as at setup
    b0: torch.Tensor  # [n, out, r]
    c0: torch.Tensor  # [n]: ||B_0 A_0||^2
    experts: int = 1  # E: each A holds E experts' r rows, each B their r columns interleaved (PEFT's ParamWrapper)

    @classmethod
    def of(cls, a: list[nn.Parameter], b: list[nn.Parameter], scalings: list[float], experts: int = 1) -> LoraGroup:
        a0, b0 = per_expert(torch.stack([full(p).detach().float() for p in a]),
                            torch.stack([full(p).detach().float() for p in b]), experts)  # fmt: skip
        c0 = ((b0.mT @ b0) * (a0 @ a0.mT)).sum((1, 2))
        s2 = torch.tensor(scalings, device=a0.device).square().repeat_interleave(experts)
        return cls(a, b, s2, a0, b0, c0, experts)

    def whole(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every adapter's (every expert's) A and B stacked, fp32, whole (gathered from the shards under FSDP2)."""
        a = torch.stack([full(p) for p in self.a]).float()
        b = torch.stack([full(p) for p in self.b]).float()
        return per_expert(a, b, self.experts)

    def value(self) -> torch.Tensor:
        """1/2 sum s^2 ||B A - B_0 A_0||^2 from r x r products: ||BA||^2 - 2 <BA, B_0 A_0> + ||B_0 A_0||^2."""
        a, b = self.whole()
        cross = ((b.mT @ self.b0) * (self.a0 @ a.mT).mT).sum((1, 2))
        sq = ((b.mT @ b) * (a @ a.mT)).sum((1, 2)) - 2 * cross + self.c0
        return 0.5 * (self.s2 * sq.clamp(min=0)).sum()

    def pull(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The gradient of value() for each A and for each B (this process's shards of them), fp32."""
        a, b = self.whole()
        aat, a0at, btb, btb0 = a @ a.mT, self.a0 @ a.mT, b.mT @ b, b.mT @ self.b0
        s2 = self.s2[:, None, None]
        grad_a = s2 * (btb @ a - btb0 @ self.a0)
        grad_b = s2 * (b @ aat - self.b0 @ a0at)
        grad_a, grad_b = per_adapter(grad_a, grad_b, self.experts)
        grads_a = [shard_like(g, p) for g, p in zip(grad_a.unbind(0), self.a)]
        grads_b = [shard_like(g, p) for g, p in zip(grad_b.unbind(0), self.b)]
        return grads_a, grads_b


def per_expert(a: torch.Tensor, b: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, E r, in], [n, out, r E] -> [n E, r, in], [n E, out, r]: each expert's A_e and B_e (as PEFT's
    ParamWrapper.get_delta_weight reads them: A's rows in expert blocks, B's columns interleaved)."""
    if experts == 1:
        return a, b
    n, rows, width = a.shape
    out = b.shape[1]
    a = a.reshape(n * experts, rows // experts, width)
    b = b.reshape(n, out, rows // experts, experts).permute(0, 3, 1, 2).reshape(n * experts, out, rows // experts)
    return a, b


def per_adapter(a: torch.Tensor, b: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of per_expert: per-expert tensors back to each adapter's A and B layout."""
    if experts == 1:
        return a, b
    total, r, width = a.shape
    out = b.shape[1]
    n = total // experts
    a = a.reshape(n, experts * r, width)
    b = b.reshape(n, experts, out, r).permute(0, 2, 3, 1).reshape(n, out, r * experts)
    return a, b


def lora_groups(model: nn.Module) -> list[LoraGroup]:
    """The trainable (A, B) pairs of the model's LoRA Linear layers, grouped by shape, with their values now."""
    if "peft" not in sys.modules:  # no PEFT imported, so no LoRA layer can exist: skip its slow import
        return []
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    by_shape: dict[tuple, tuple[list, list, list]] = {}
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        experts = module.num_experts if isinstance(module, ParamWrapper) else 1
        for name in module.active_adapters:
            if name not in module.lora_A:
                continue
            a, b = module.lora_A[name], module.lora_B[name]
            if (
                isinstance(a, nn.Linear)
                and isinstance(b, nn.Linear)
                and a.weight.requires_grad
                and b.weight.requires_grad
            ):
                key = (tuple(a.weight.shape), tuple(b.weight.shape), a.weight.dtype, a.weight.device, experts)
                members = by_shape.setdefault(key, ([], [], []))
                members[0].append(a.weight)
                members[1].append(b.weight)
                members[2].append(float(module.scaling[name]))
    return [LoraGroup.of(*members, experts=key[-1]) for key, members in by_shape.items()]


@register("l2_sp", L2SPConfig)
class L2SP(Regularizer):
    touches_parameters = True

    def __init__(self, config: L2SPConfig) -> None:
        self.config = config
        self.decoupled = config.form == "decoupled"
        self.params: list[torch.Tensor] = []
        self.anchors: list[torch.Tensor] = []
        self.views: list[torch.Tensor] | None = None
        self.lora: list[LoraGroup] = []
        self._pulled: list[tuple[LoraGroup, list[torch.Tensor], list[torch.Tensor]]] = []  # for step_begin
        self._scale = 0.0  # lambda, as the stack hands it to penalty_grad; the decoupled pull uses it in step_begin
        self._groups: tuple[torch.optim.Optimizer, list[tuple[dict, list[int]]], dict[int, dict]] | None = None

    def memory(self) -> dict[str, int]:
        return {"anchor": nbytes(self.anchors), "work buffer": scratch_bytes(self.views)}

    def setup(self, ctx: SetupContext) -> None:
        self.lora = lora_groups(ctx.model)
        in_pairs = {id(p) for group in self.lora for p in (*group.a, *group.b)}
        self.params = [p for _, p in trainable(ctx.model, ctx.new_parameters) if id(p) not in in_pairs]
        self.anchors = snapshot(self.params, DTYPES.get(self.config.anchor_dtype or ""))
        self.views = None if self.decoupled else scratch(self.params)

    def penalty_grad(self, scale: float) -> None:
        """The penalty form adds scale * its gradient; the decoupled form keeps the adapters' pulls for step_begin
        (the elementwise decoupled pull needs no gradient: step_begin takes it from theta_t)."""
        self._scale, self._pulled = scale, []
        if not self.decoupled:
            add_pull(self.params, self.anchors, None, scale, self.views)
        groups = [g for g in self.lora if g.a[0].grad is not None and g.b[0].grad is not None]
        if not groups or not scale:
            return
        with torch.no_grad():
            pulls = [(group, *group.pull()) for group in groups]
            if self.decoupled:  # applied in step_begin, from the same theta_t
                self._pulled = pulls
                return
            for group, grads_a, grads_b in pulls:
                torch._foreach_add_(grad_shards(group.a), grads_a, alpha=scale)
                torch._foreach_add_(grad_shards(group.b), grads_b, alpha=scale)

    def penalty_value(self) -> torch.Tensor | None:
        """1/2 * sum (theta - theta_0)^2 over the elementwise tensors plus each adapted layer's pull."""
        if not self.params and not self.lora:
            return None
        with torch.no_grad():
            values = [quadratic_value(self.params, self.anchors)] if self.params else []
            for group in self.lora:
                value = group.value()  # on every process: under FSDP2 it gathers A and B
                counted = not is_sharded(group.a[0]) or is_main_process()  # pulled whole: counted on one process
                values.append(value if counted else torch.zeros_like(value))
        return torch.stack(values).sum()

    def step_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Decoupled form: theta <- theta - lr * lambda * (theta - theta_0) with each group's lr, from theta_t."""
        if not self.decoupled or not self._scale:
            return
        with torch.no_grad():
            grouped, group_of = self._grouped(optimizer)
            for group, indices in grouped:
                keep = [i for i in indices if self.params[i].grad is not None]  # as AdamW skips them, so does this
                params, anchors = [local(self.params[i]) for i in keep], [self.anchors[i] for i in keep]
                weight = group["lr"] * self._scale
                if params and params[0].dtype == anchors[0].dtype:
                    torch._foreach_lerp_(params, anchors, weight)  # theta + w * (theta_0 - theta): one fused pass
                elif params:  # a lower-precision anchor: lerp_ wants one dtype
                    torch._foreach_add_(params, torch._foreach_sub(params, anchors), alpha=-weight)
            pulled, self._pulled = self._pulled, []
            for lora, grads_a, grads_b in pulled:  # each adapter with the lr of its optimizer group (LLRD)
                held = [i for i, a in enumerate(lora.a) if id(a) in group_of]
                steps = [-group_of[id(lora.a[i])]["lr"] * self._scale for i in held]
                for params, grads in ((lora.a, grads_a), (lora.b, grads_b)):
                    moves = torch._foreach_mul([grads[i] for i in held], steps)
                    torch._foreach_add_([local(params[i]) for i in held], moves)

    def _grouped(self, optimizer: torch.optim.Optimizer) -> tuple[list[tuple[dict, list[int]]], dict[int, dict]]:
        """([(param group, indices into self.params of its tensors)], {id(tensor): its group}), cached per
        optimizer. Groups are the live dicts, so "lr" follows the scheduler; a tensor the optimizer does not hold is
        not pulled."""
        if self._groups is None or self._groups[0] is not optimizer:
            index = {id(p): i for i, p in enumerate(self.params)}
            grouped = [(g, [index[id(p)] for p in g["params"] if id(p) in index]) for g in optimizer.param_groups]
            group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
            self._groups = (optimizer, [(g, idx) for g, idx in grouped if idx], group_of)
        return self._groups[1], self._groups[2]
