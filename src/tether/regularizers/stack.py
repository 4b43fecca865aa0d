"""The one composition point: builds regularizers from config, sums their weighted penalties, logs each term."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from tether.distributed import has_sharded_parameters, sum_across_processes, world_size
from tether.errors import ConfigError, NonFiniteError, TetherError
from tether.reference import Reference, merge_options
from tether.regularizers.base import (
    REGISTRY,
    FinishContext,
    Regularizer,
    RegularizerConfig,
    RunFacts,
    SetupContext,
    base_name,
    config_error,
    named_params_with_module,
)
from tether.regularizers.shaping import weighted_nll
from tether.section import RegularizerEntry

log = logging.getLogger(__name__)
SKIPPED = "stack.skipped_steps"  # a key no regularizer name can produce (names have no dots)


def parse_entries(entries: list[RegularizerEntry], run: RunFacts | None = None) -> list[RegularizerConfig]:
    """Validate each `regularizers:` item against its registered config class and, given the run's facts, whether it
    can act in that run (RegularizerConfig.check_run); errors name the item and field."""
    configs = []
    for i, entry in enumerate(entries):
        if entry.name not in REGISTRY:
            known = ", ".join(sorted(REGISTRY))
            raise config_error(i, f"unknown regularizer '{entry.name}': use one of {known}")
        try:
            configs.append(REGISTRY[entry.name].config.model_validate(entry.model_dump()))
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                raise config_error(i, f"'{field}' is not a field of {entry.name}: remove it") from None
            msg = err["msg"].removeprefix("Value error, ")
            raise config_error(i, f"{entry.name}.{field}: {msg} (got {err.get('input')!r}): change it") from None
    names = [c.name for c in configs]
    for name in set(names):
        if names.count(name) > 1:
            raise config_error(names.index(name), f"'{name}' appears twice: merge the entries into one")
    for i, config in enumerate(configs):
        message = None if run is None else config.check_run(run)
        if message is not None:
            raise config_error(i, message)
    return configs


class RegularizerStack:
    """Calls every regularizer at each point in order; the trainer talks to this object only."""

    def __init__(
        self,
        regularizers: list[tuple[Regularizer, float]],
        skip_non_finite: int = 0,
        new_parameters: frozenset[str] = frozenset(),
    ) -> None:
        self.items = regularizers
        self.penalty_names = self.overriding("penalty")
        """The regularizers with an autograd penalty (they need the logits of the forward that makes the loss)."""
        self.shaping_names = self.overriding("token_weights")
        """The loss-shaping regularizers (the stack computes the task loss itself: token_loss)."""
        self._shaping = [(reg, strength) for reg, strength in regularizers if reg.name in self.shaping_names]
        self.group_names = self.overriding("param_groups")
        """The optimizer-level regularizers (they shape the optimizer's parameter groups)."""
        # an update filter (Regularizer.filters_update) runs its step_begin last and its step_end first
        self.begin_order = sorted(regularizers, key=lambda item: item[0].filters_update)
        self.end_order = sorted(regularizers, key=lambda item: not item[0].filters_update)
        self.configs: list[RegularizerConfig] = []
        """The configs the regularizers were built from (from_configs): setup checks them against the run."""
        self.reference_rows_given = False
        """train_data was given reference rows (replay's source): setup's check counts them as reference data."""
        self.new_parameters = new_parameters
        """Parameters that loading initialized (tether.models.Loaded.new_parameters): never anchored, full lr."""
        self.is_set_up = False
        self.skip_budget = skip_non_finite
        self.skipped = 0
        """Optimizer steps dropped because the loss (with its autograd penalties) was NaN/inf (at most skip_budget)."""
        self._non_finite: str | None = None  # what went non-finite in this step's micro-batches
        self._skipping = False
        self._sums: dict[str, torch.Tensor] = {}
        self._last: dict[str, torch.Tensor] = {}  # weighted autograd terms of the current micro-batch
        self._shaped: dict[str, torch.Tensor] = {}  # token_loss's terms, until this micro-batch's penalty() logs them
        self._counts: dict[str, int] = {}
        self.sharded = False  # FSDP2: each process holds a shard of every parameter
        self.reference: Reference | None = None
        self.set_up_on: frozenset[int] = frozenset()
        """ids of the trainable parameters at setup: the trainer checks it trains those (no adapter added since)."""

    @classmethod
    def from_configs(
        cls, configs: list[RegularizerConfig], skip_non_finite: int = 0, new_parameters: frozenset[str] = frozenset()
    ) -> RegularizerStack:
        stack = cls([(REGISTRY[c.name].cls(c), c.strength) for c in configs], skip_non_finite, new_parameters)
        stack.configs = list(configs)
        return stack

    @property
    def names(self) -> list[str]:
        return [reg.name for reg, _ in self.items]

    def overriding(self, hook: str) -> list[str]:
        """The names of the regularizers that implement `hook` (a Regularizer method) rather than its default."""
        return [reg.name for reg, _ in self.items if getattr(type(reg), hook) is not getattr(Regularizer, hook)]

    def setup(self, ctx: SetupContext) -> None:
        """Checks every regularizer against the run as the model and data show it (RegularizerConfig.check_run, as
        parse_entries does from a config), then builds the one frozen Reference first, when one is asked for:
        before any setup changes the model."""
        facts = ctx.facts()  # reference rows given to train_data count as reference data too
        facts = dataclasses.replace(facts, reference_data=facts.reference_data or self.reference_rows_given)
        for i, config in enumerate(self.configs):
            message = config.check_run(facts)
            if message is not None:
                raise config_error(i, message)
        if has_sharded_parameters(ctx.model):
            self.check_shardable()
            self.sharded = True
        ctx = dataclasses.replace(ctx, new_parameters=self.new_parameters)
        self.check_reference_is_pretrained()
        wanted = [opts for reg, _ in self.items if (opts := reg.reference_options()) is not None]
        if wanted and ctx.reference is None:
            ctx = dataclasses.replace(ctx, reference=Reference.build(ctx.model, merge_options(wanted)))
        self.reference = ctx.reference
        for reg, _ in self.items:
            reg.setup(ctx)
        self.set_up_on = frozenset(id(p) for p in ctx.model.parameters() if p.requires_grad)
        self.is_set_up = True

    def check_reference_is_pretrained(self) -> None:
        """The frozen reference is the model as loaded: parameters that loading initialized (a classification head
        on a language model) are random there, and kl / distill would pull the predictions toward theirs."""
        referenced = [reg.name for reg, _ in self.items if reg.reference_options() is not None]
        if referenced and self.new_parameters:
            new = ", ".join(sorted(self.new_parameters)[:4]) + (", ..." if len(self.new_parameters) > 4 else "")
            raise ConfigError(
                f"{', '.join(referenced)} compare the predictions with the original model's, and loading initialized "
                f"{new} at random (not in the checkpoint): they would pull toward a random head: drop "
                f"{', '.join(referenced)} (l2_sp, ewc and si anchor the pre-trained weights and leave new ones free)"
            )

    def check_shardable(self) -> None:
        """Refuse the regularizers that need whole parameter tensors, which FSDP2 splits over the processes."""
        whole = [reg.name for reg, _ in self.items if not reg.sharded_parameters]
        if whole:
            names = ", ".join(whole)
            raise ConfigError(f"{names} keep whole-model copies and do not run on FSDP: use DDP or drop them")

    def train_data(
        self,
        train: list[dict],
        reference: list[dict] | None,
        seed: int,
        load: Callable[[str], list[dict]] | None = None,
        ctx: SetupContext | None = None,
    ) -> list[dict]:
        """The training rows after each regularizer's train_data, in order (replay mixes reference rows in; ctx: the
        model before setup, for self_replay's generation: Regularizer.train_data), those that only read them last
        (Regularizer.reads_rows: flow weighs the rows replay mixed in, whatever the order of the list)."""
        self.reference_rows_given = self.reference_rows_given or reference is not None
        for reg, _ in sorted(self.items, key=lambda item: item[0].reads_rows):
            train = reg.train_data(train, reference, seed, load, ctx)
        return train

    def after_training(self, model: nn.Module, ctx: FinishContext) -> dict[str, dict[str, Any]]:
        """{name: results} of the regularizers that evaluate or save something after training (ema, wise_ft)."""
        results = {reg.name: reg.after_training(model, ctx) for reg, _ in self.items}
        return {name: result for name, result in results.items() if result}

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimizer groups: the pre-trained trainable parameters and the new ones (initialized at loading), then
        each regularizer splits or re-weights them. From the model's structure only: it may run before setup."""
        named = [(n, p) for n, p, _ in named_params_with_module(model) if p.requires_grad]
        is_new = [base_name(n) in self.new_parameters for n, _ in named]
        groups: list[dict[str, Any]] = [
            {"params": [p for (_, p), new in zip(named, is_new) if new == fresh], "weight_decay": 0.0, "lr_scale": 1.0,
             "group": "new" if fresh else "all", "new": fresh}
            for fresh in (False, True)
        ]  # fmt: skip
        for reg, _ in self.items:
            groups = reg.param_groups(model, groups)
        return [g for g in groups if g["params"]]

    def optimizer_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        """param_groups with each group's lr set (base lr times its lr_scale), ready for any torch optimizer."""
        groups = self.param_groups(model)
        for g in groups:
            g["lr"] = lr * g.pop("lr_scale")
        return groups

    def prefetch(self, inputs: dict[str, Any]) -> None:
        """The reference's logits for this batch, computed before the model's own forward: its activations are
        then not alive during the reference forward, which lowers the step's peak memory."""
        if self.reference is not None:
            self.reference.logits(inputs)

    def token_loss(self, inputs: dict[str, Any], logits: torch.Tensor) -> torch.Tensor:
        """The task loss when regularizers shape it: the model's cross-entropy on inputs["labels"], each loss token
        weighted by the shaping regularizers (shaping.weighted_nll), a mean over this micro-batch's loss positions.
        Each one's term, its weighting's cross-entropy minus the plain one, is logged as `reg/<name>` with this
        micro-batch's penalties."""
        weighers = [(reg.token_weights(inputs), strength) for reg, strength in self._shaping]
        loss, terms = weighted_nll(logits, inputs["labels"], weighers)
        self._shaped = {reg.name: term for (reg, _), term in zip(self._shaping, terms)}
        return loss

    def penalty(self, model: nn.Module, inputs: dict[str, Any], outputs: Any) -> torch.Tensor | None:
        """Weighted sum of the autograd penalties of this micro-batch; None when no regularizer has one. Logs them
        with the shaping terms of this micro-batch's token_loss (asft has both: one `reg/asft`)."""
        total, self._last, shaped = None, {}, self._shaped
        self._shaped = {}
        for reg, strength in self.items:
            value = reg.penalty(model, inputs, outputs)
            if value is None:
                if reg.name in shaped:
                    self._record(reg.name, shaped[reg.name], strength)
                continue
            self._record(reg.name, value + shaped[reg.name] if reg.name in shaped else value, strength)
            total = strength * value if total is None else total + strength * value
        if self.reference is not None:
            self.reference.clear()  # every user of this batch's teacher logits has run: free them before backward
        return total

    def before_step(self) -> None:
        """Closed-form penalty gradients, added once per optimizer step (after clipping; see README)."""
        if not self.is_set_up:
            raise TetherError(
                "the regularizer stack was never set up: call stack.setup(SetupContext(model, ...)) before training"
            )
        for reg, strength in self.items:
            reg.penalty_grad(strength)

    def step_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """In order, except that an update filter (Regularizer.filters_update) comes last."""
        for reg, _ in self.begin_order:
            reg.step_begin(model, optimizer)

    def step_end(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """In order, except that an update filter comes first."""
        for reg, _ in self.end_order:
            reg.step_end(model, optimizer)

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Run before_step + step_begin / step_end around every optimizer.step(), however the Trainer wraps it."""

        def pre_hook(opt: torch.optim.Optimizer, *_: Any) -> None:  # must return None: a value would replace args
            self.before_step()
            self._skipping = self._skip_this_step()
            if self._skipping:
                for group in opt.param_groups:
                    for p in group["params"]:
                        p.grad = None  # torch optimizers leave parameters without a gradient untouched
                return
            self.step_begin(model, opt)

        def post_hook(opt: torch.optim.Optimizer, *_: Any) -> None:
            if not self._skipping:
                self.step_end(model, opt)

        optimizer.register_step_pre_hook(pre_hook)
        optimizer.register_step_post_hook(post_hook)

    def flag_non_finite(self, message: str) -> None:
        """A loss or penalty went NaN/inf: the coming optimizer step skips or stops, on every process alike."""
        if self._non_finite is None:
            self._non_finite = message

    def discard_flags(self) -> None:
        """After each optimizer step: a flag the step did not read (fp16's loss scaler skipped the step, as it
        does for non-finite gradients) must not stop the next, healthy step."""
        self._non_finite = None

    def _skip_this_step(self) -> bool:
        """Whether any process flagged this step; raises NonFiniteError when the skip budget is spent."""
        bad = self._non_finite is not None
        if world_size() > 1:  # every process must skip or stop together, or the others wait for it forever
            device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
            bad = bool(sum_across_processes([torch.tensor([float(bad)], device=device)])[0].item())
        if not bad:
            return False
        message = self._non_finite or "a loss became non-finite on another process"
        self._non_finite = None
        if self.skipped >= self.skip_budget:
            raise NonFiniteError(message)
        self.skipped += 1
        log.warning("skipped an optimizer step (%d of %d allowed): %s", self.skipped, self.skip_budget, message)
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every regularizer's training state as `<name>.<key>` tensors, and the skipped steps (for checkpoints)."""
        state = {f"{reg.name}.{k}": v for reg, _ in self.items for k, v in reg.state_dict().items()}
        return {**state, SKIPPED: torch.tensor(self.skipped)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.skipped = int(state.get(SKIPPED, 0))
        for reg, _ in self.items:
            prefix = f"{reg.name}."
            own = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            if reg.state_dict() and not own:
                raise TetherError(f"the checkpoint holds no state for '{reg.name}': resume with the config it used")
            reg.load_state_dict(own)

    def memory(self) -> dict[str, int]:
        """{'<name>: <what>': bytes} of what the regularizers and the reference hold beyond the model."""
        held = {f"{reg.name}: {what}": n for reg, _ in self.items for what, n in reg.memory().items() if n}
        if self.reference is not None:
            held.update({f"reference: {what}": n for what, n in self.reference.memory().items()})
        return held

    def non_finite_term(self) -> str:
        """Which weighted autograd term of the last micro-batch went NaN/inf, said so that the user can act."""
        for name, weighted in self._last.items():
            if not torch.isfinite(weighted):
                return f"reg/{name} became {weighted.item()} (weighted): lower its strength or the learning rate"
        return "a penalty became non-finite: lower the strengths or the learning rate"

    def _record(self, name: str, value: torch.Tensor, strength: float) -> None:
        value = value.detach().float()
        self._last[name] = value * strength
        self._sums[name] = self._sums[name] + value if name in self._sums else value
        self._counts[name] = self._counts.get(name, 0) + 1

    def pop_logs(self) -> dict[str, float]:
        """Each unweighted term as `reg/<name>`: an autograd penalty's mean over the micro-batches since the last
        call, a closed-form penalty's value at the current weights. Every process calls this at the same step."""
        logs = {f"reg/{n}": (s / self._counts[n]).item() for n, s in self._sums.items()}
        self._sums, self._counts = {}, {}
        return logs | self.closed_form_values()

    def closed_form_values(self) -> dict[str, float]:
        """`reg/<name>` of the closed-form penalties at the current weights; raises NonFiniteError naming the term
        when a weighted one is NaN/inf (in fp32, as a loss term would be): its strength overflows it, or the weights
        did. Under FSDP2 each process holds a part of each value: one all-reduce sums them."""
        terms = [
            (reg.name, value, strength) for reg, strength in self.items if (value := reg.penalty_value()) is not None
        ]
        if not terms:
            return {}
        values = torch.stack([value.detach().double() for _, value, _ in terms])
        if self.sharded and world_size() > 1:
            sum_across_processes([values])
        weighted = (values * values.new_tensor([strength for *_, strength in terms])).float()
        for (name, *_), term in zip(terms, weighted.tolist()):
            if not math.isfinite(term):
                raise NonFiniteError(f"reg/{name} became {term} (weighted): lower its strength or the learning rate")
        return {f"reg/{name}": value for (name, *_), value in zip(terms, values.tolist())}
