"""The regularizer protocol, the context it is set up with, and the registry that builds regularizers from config.

A regularizer takes part at up to six points, each with a default that does nothing, so the trainer never probes:
  setup          before training: snapshot anchors, estimate importances, change dropout, ...
  param_groups   optimizer level: split or re-weight the optimizer's parameter groups (weight decay, LLRD)
  penalty        an *unweighted* scalar through autograd from the model, the batch and its outputs
  penalty_grad   an *unweighted* quadratic-style penalty whose gradient is known in closed form: the stack hands
                 it a scale and it adds scale * d(penalty)/d(theta) to the gradients with fused foreach ops, once
                 per optimizer step, and returns the penalty value (detached) for logging
  step_begin     before the optimizer step, after penalty_grad: changes that use theta_t, as AdamW's decay does
  step_end       after the optimizer step (EMA, online updates)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from pydantic import ConfigDict, Field
from torch import nn

from tether.config import Section
from tether.errors import ConfigError


class RegularizerConfig(Section):
    """Fields every regularizer has; each regularizer's config subclasses this with its own documented fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)
    name: str
    """Registered name of the regularizer."""
    strength: float = Field(0.0, ge=0)
    """Multiplier of the penalty (lambda); for optimizer-level regularizers, its documented meaning."""


@dataclass
class SetupContext:
    """What a regularizer may use in `setup`: the model to train and, when configured, the reference data."""

    model: nn.Module
    reference_batches: Callable[[], Iterable[dict[str, torch.Tensor]]] | None = None
    """Yields collated batches of the reference data on the model's device (None when no reference data)."""
    learning_rate: float = 0.0


class Regularizer(Protocol):
    """The shape every regularizer has. Subclass it explicitly to inherit the do-nothing defaults."""

    name: ClassVar[str]

    def setup(self, ctx: SetupContext) -> None:
        return None

    def param_groups(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return groups

    def penalty(self, model: nn.Module, inputs: dict[str, Any], outputs: Any) -> torch.Tensor | None:
        return None

    def penalty_grad(self, scale: float) -> torch.Tensor | None:
        return None

    def step_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        return None

    def step_end(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        return None


@dataclass(frozen=True)
class Registered:
    cls: type
    config: type[RegularizerConfig]


REGISTRY: dict[str, Registered] = {}


def register(name: str, config: type[RegularizerConfig]) -> Callable[[type], type]:
    """Class decorator: make a regularizer buildable from `{name: <name>, ...}` with its config class."""

    def deco(cls: type) -> type:
        if name in REGISTRY:
            raise ValueError(f"regularizer '{name}' is registered twice: rename one of them")
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ValueError(f"regularizer name '{name}' must be lower_snake_case")
        cls.name = name
        REGISTRY[name] = Registered(cls, config)
        return cls

    return deco


def no_decay(module: nn.Module, param_name: str, param: torch.Tensor) -> bool:
    """Biases, every norm (LayerNorm, RMSNorm and custom *Norm classes, matched by class name) and 1-D tensors."""
    return param_name.endswith("bias") or param.ndim < 2 or "norm" in type(module).__name__.lower()


def trainable_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters that weight-type penalties act on: not biases, norms or other 1-D tensors."""
    return [(n, p) for n, p, m in named_params_with_module(model) if p.requires_grad and not no_decay(m, n, p)]


def named_params_with_module(model: nn.Module) -> list[tuple[str, nn.Parameter, nn.Module]]:
    """(qualified name, parameter, owning module) for each parameter once (tied weights are listed once)."""
    seen: set[int] = set()
    out = []
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            out.append((f"{mod_name}.{p_name}" if mod_name else p_name, p, module))
    return out


def config_error(index: int, message: str) -> ConfigError:
    return ConfigError(f"regularizers[{index}]: {message}")
