"""The regularizer protocol, the context it is set up with, and the registry that builds regularizers from config.

Every hook has a default that does nothing, so the trainer never probes. In the order a run meets them:
 with the config, before anything is loaded (tether validate and train alike)
  RegularizerConfig.check_run  what to change when the regularizer cannot act in this run (no reference data,
                 options for another kind of fine-tuning, ...); parse_entries asks it, setup asks it again
 before training
  train_data     before the Trainer is built: change the training rows (replay mixes reference rows in, flow
                 weighs them); `load(path)` reads and encodes another data file as the reference data is; `ctx`,
                 when the caller has the model (tether train does), a SetupContext with the model as it will
                 train, before setup and any step (the original model; a LoRA adapter still fresh), the run
                 directory and the progress display: self_replay generates its rows with it
  reference_options  the options of the frozen reference (tether.reference) when the regularizer compares with the
                 original model's outputs (distill, kl); the stack builds one Reference for all of them, first
  setup          snapshot anchors, estimate importances, change dropout, ...
  param_groups   optimizer level: split or re-weight the optimizer's parameter groups (weight decay, LLRD), from
                 the model's structure alone: the Trainer may build the optimizer before setup (FSDP2 does)
 every micro-batch
  token_weights  loss shaping (dft, eaft, flow): how to weight each loss token's cross-entropy in this batch; the
                 stack then computes the task loss itself, once, from the model's logits (shaping.weighted_nll)
  penalty        an *unweighted* scalar through autograd from the model, the batch and its outputs
 every optimizer step (tether.step: after backward and clipping, around optimizer.step())
  penalty_grad   a penalty whose gradient is known in closed form (quadratic pulls, L1): the stack hands it a
                 scale and it adds scale * d(penalty)/d(theta) to the gradients (fused foreach ops on
                 accelerators, tensor by tensor through a cache-sized scratch on CPU: anchor.scratch)
  step_begin     before the optimizer step, after penalty_grad: changes that use theta_t, as AdamW's decay does
  step_end       after the optimizer step (EMA, online updates); an update filter (mofo) runs its step_begin last
                 and its step_end first
 when logs are written or a checkpoint saved
  penalty_value  the closed-form penalty, unweighted, at the current weights: a step never pays for a pass that
                 only logs read
  state_dict / load_state_dict   tensors that change during training and must survive a kill (the EMA average):
                 written into every checkpoint, loaded on resume
 after training
  after_training after the main metrics: evaluate or save alternative models (ema, wise_ft); the returned dict
                 goes into metrics.json under the regularizer's name
 bookkeeping
  memory         bytes held beyond the model (anchors, Fisher, averages), for the estimate printed before training
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from pydantic import ConfigDict, Field, ValidationInfo, field_validator
from torch import nn

from tether.errors import ConfigError
from tether.section import Section

if TYPE_CHECKING:
    from tether.reference import Reference, ReferenceOptions
    from tether.regularizers.shaping import TokenWeights


@dataclass(frozen=True)
class RunFacts:
    """What a regularizer's config is checked against before anything is loaded (RegularizerConfig.check_run)."""

    reference_data: bool
    """The run has reference rows (data.reference, or rows given to the stack)."""
    adapter: str | None
    """The PEFT adapter the model trains through ("lora", "osf"; None: the whole model): switched off, the model is
    the original (the frozen reference needs no copy)."""
    learning_rate: float


class RegularizerConfig(Section):
    """Fields every regularizer has; each regularizer's config subclasses this with its own documented fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)
    name: str
    """Registered name of the regularizer."""
    strength: float = Field(0.0, ge=0)
    """Multiplier of the penalty (lambda); for optimizer-level regularizers, its documented meaning."""

    def without_reference_data(self) -> str | None:
        """What to change when the run has no data.reference and this regularizer needs it (None: it does not)."""
        return None

    def check_run(self, run: RunFacts) -> str | None:
        """What to change when this regularizer cannot act in this run (None: it can). parse_entries asks it from
        the config, so `tether validate` and `train` refuse alike before anything is loaded or written; setup asks
        it again from the model (SetupContext.facts) for callers that build the stack themselves."""
        return None if run.reference_data else self.without_reference_data()


def _cannot_read(path: str, field: str) -> Callable[..., Iterable[dict[str, torch.Tensor]]]:
    raise ConfigError(f"{field}: this caller cannot read data files: pass the rows as the reference data")


@dataclass
class SetupContext:
    """What a regularizer may use in `setup`: the model to train and, when configured, the reference data."""

    model: nn.Module
    reference_batches: Callable[..., Iterable[dict[str, torch.Tensor]]] | None = None
    """reference_batches(shard=True) yields collated batches of the reference data on the model's device (None when
    no reference data); with several processes each gets its own share, or all of it with shard=False."""
    learning_rate: float = 0.0
    reference: Reference | None = None
    """The frozen original model's outputs (built by the stack when a regularizer asks for it)."""
    output_dir: Path | None = None
    """The run directory, for what a regularizer computes once and keeps (the Fisher); None outside a run."""
    progress: Callable[[str, int | None], Callable[[int], None]] | None = None
    """progress(description, total or None) starts a progress display and returns advance(n); None: silent."""
    new_parameters: frozenset[str] = frozenset()
    """Names (as in the un-wrapped model, see base_name) of the parameters that loading initialized because the
    checkpoint lacked them (a new classification head): the pulls toward the pre-trained weights leave them out.
    RegularizerStack.setup fills it in from the stack's own."""
    read_batches: Callable[[str, str], Callable[..., Iterable[dict[str, torch.Tensor]]]] = _cannot_read
    """read_batches(path, field) reads and encodes another data file as the reference data is read (ewc.data) and
    returns a batches(shard=True) callable like reference_batches."""

    def facts(self) -> RunFacts:
        """The run as RegularizerConfig.check_run sees it, from the model and data at hand."""
        from tether.reference import is_peft  # late: tether.reference imports this module

        adapter = None
        if is_peft(self.model):
            adapter = str(self.model.active_peft_config.peft_type.value).lower()
        return RunFacts(self.reference_batches is not None, adapter, self.learning_rate)


@dataclass
class FinishContext:
    """What a regularizer may use in `after_training`: where the run writes, and how it measures and saves."""

    output_dir: Path
    evaluate: Callable[[nn.Module], dict[str, Any]]
    """The run's metrics of a model: target.*, overfit_gap and, with reference data, forgetting.*."""
    save: Callable[[nn.Module, str], Path]
    """save(model, name): save_pretrained (and the tokenizer) into output_dir/name atomically; returns the path."""


class NoPenaltyConfig(RegularizerConfig):
    """Base of the configs of regularizers without a penalty, whose own fields set their effect."""

    strength: float = 0.0
    """Unused: this regularizer adds no penalty. Leave it out."""

    @field_validator("strength")
    @classmethod
    def _no_strength(cls, value: float, info: ValidationInfo) -> float:
        if value != 0:
            raise ValueError(f"{info.data.get('name')} adds no penalty, so strength is unused: remove it")
        return value


class Regularizer(Protocol):
    """The shape every regularizer has. Subclass it explicitly to inherit the do-nothing defaults. The hooks are
    listed in the order a run calls them (the module docstring says what each is for)."""

    name: ClassVar[str]
    sharded_parameters: ClassVar[bool] = True
    """False: needs whole parameter tensors (a whole-model average), so it cannot run on FSDP2's shards."""
    touches_parameters: ClassVar[bool] = False
    """True: reads or writes the parameters or their gradients directly (anchors, closed-form pulls), which
    DeepSpeed ZeRO hides in its own flattened partitions."""
    reads_rows: ClassVar[bool] = False
    """True: its train_data only reads the training rows (flow weighs them): the stack gives it the rows after every
    regularizer that changes them (replay, self_replay), wherever it is listed."""
    filters_update: ClassVar[bool] = False
    """True: undoes part of the optimizer's own update (mofo): its step_begin runs after every other's, its
    step_end before every other's, so that it sees exactly the optimizer's step."""

    # -- before training: the data, the frozen reference, the setup, the optimizer's groups ---------------------
    def train_data(
        self,
        train: list[dict],
        reference: list[dict] | None,
        seed: int,
        load: Callable[[str], list[dict]] | None = None,
        ctx: SetupContext | None = None,
    ) -> list[dict]:
        return train

    def reference_options(self) -> ReferenceOptions | None:
        return None

    def setup(self, ctx: SetupContext) -> None:
        return None

    def param_groups(self, model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return groups

    # -- every micro-batch: the loss -----------------------------------------------------------------------------
    def token_weights(self, inputs: dict[str, Any]) -> TokenWeights:
        raise NotImplementedError  # only asked of the regularizers that implement it (RegularizerStack.overriding)

    def penalty(self, model: nn.Module, inputs: dict[str, Any], outputs: Any) -> torch.Tensor | None:
        return None

    # -- every optimizer step: after backward and clipping, around optimizer.step() --------------------------
    def penalty_grad(self, scale: float) -> None:
        return None

    def step_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        return None

    def step_end(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        return None

    # -- when logs are written or a checkpoint saved ---------------------------------------------------------
    def penalty_value(self) -> torch.Tensor | None:
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        return None

    # -- after training --------------------------------------------------------------------------------------
    def after_training(self, model: nn.Module, ctx: FinishContext) -> dict[str, Any]:
        return {}

    # -- bookkeeping -----------------------------------------------------------------------------------------
    def memory(self) -> dict[str, int]:
        return {}


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


WRAPPER_PARTS = ("modules_to_save.default.", "original_module.", "base_layer.", "_orig_mod.", "_fsdp_wrapped_module.")


def base_name(name: str) -> str:
    """A parameter's name in the model as loaded, without what PEFT, torch.compile or FSDP1 put around it
    (base_model.model.score.modules_to_save.default.weight -> score.weight)."""
    name = name.removeprefix("base_model.model.")
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def no_decay(module: nn.Module, param_name: str, param: torch.Tensor) -> bool:
    """Biases, every norm (LayerNorm, RMSNorm and custom *Norm classes, matched by class name), 1-D tensors, and the
    log decay rates of state-space layers (A_log: Mamba, Jamba, Bamba; the Mamba reference exempts them too: decayed
    toward 0, every channel's memory would drift toward one rate)."""
    return param_name.endswith(("bias", "A_log")) or param.ndim < 2 or "norm" in type(module).__name__.lower()


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


def nbytes(tensors: Iterable[torch.Tensor] | None) -> int:
    """Bytes held by a list of tensors (for Regularizer.memory)."""
    return sum(t.numel() * t.element_size() for t in tensors or [])


def config_error(index: int, message: str) -> ConfigError:
    return ConfigError(f"regularizers[{index}]: {message}")
