"""RegularizedTrainer: transformers.Trainer with the regularizer stack in the loss, the optimizer and the logs."""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from tether.data import Split
from tether.distributed import barrier, has_sharded_parameters
from tether.errors import ConfigError, NonFiniteError, TetherError
from tether.outputs import save_safetensors_atomic
from tether.reference import loss_mask
from tether.regularizers import RegularizerStack
from tether.step import regularized_loss, shaped_forward

STACK_STATE = "tether_state.safetensors"  # the regularizers' training state in each checkpoint-N/
STAGING = ".staging"  # checkpoints are written here, then renamed into the run directory


class RegularizedMixin:
    """Mix into transformers.Trainer or a TRL trainer: `class T(RegularizedMixin, SFTTrainer)`, set `stack` (set up
    on the model the trainer trains) and add the StepEnd(stack) callback, as RegularizedTrainer and
    tether.regularize do. What the stack cannot do beside the trainer is refused when training starts."""

    made_by_regularize: ClassVar[bool] = False
    """True for the classes tether.regularize makes (a second call is refused as such, not as a hand-mixed one)."""
    _stack: RegularizerStack | None = None
    pending_setup: Callable[[], None] | None = None
    """The stack's setup, when it must wait until FSDP has sharded the model (tether.run sets it)."""
    resume_state: dict[str, torch.Tensor] | None = None
    """The stack's state of the checkpoint train() resumes from, kept until the pending setup has run."""
    reference_measured: Split | None = None
    """The reference rows tether.finish measures ema's, wise_ft's and merge's models on (tether.regularize sets it)."""
    reference_roles: dict[str, Any] | None = None
    """Which reference rows are measured and which the regularizers read (tether.regularize sets it)."""
    reference_before: dict[str, float] | None = None
    """What the model knew of the reference data before training, when ema or wise_ft measure their models."""
    _hooked: torch.optim.Optimizer | None = None  # the optimizer the stack's hooks are attached to

    @property
    def stack(self) -> RegularizerStack:
        """The regularizers this trainer runs (tether.regularize and RegularizedTrainer set it)."""
        if self._stack is None:  # a class mixed by hand whose stack was never set: one line, not AttributeError
            raise TetherError(set_up_by_hand(type(self), "has no regularizer stack"))
        return self._stack

    @stack.setter
    def stack(self, stack: RegularizerStack) -> None:
        old, self._stack = self._stack, stack
        if old is not None:  # a StepEnd added for the stack replaced ends the new one's steps (check_regularized)
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, StepEnd) and callback.stack is old:
                    callback.stack = stack

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's train(); resuming from a checkpoint also restores the regularizers' state (EMA average,
        SI's importances, skipped steps) saved with it."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)  # None: the Trainer says so
        if resume_from_checkpoint:
            state = load_stack_state(Path(resume_from_checkpoint))
            if self.pending_setup is None:
                self.stack.load_state_dict(state)
            else:
                self.resume_state = state
        return super().train(resume_from_checkpoint or None, *args, **kwargs)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Steps 1-3 of tether.step: prefetch, the task loss (the Trainer's own, or shaped by the stack), the
        weighted autograd penalties. Without either nothing needs the outputs: the trainer's own compute_loss."""
        if not model.training:  # evaluation never adds penalties
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not self.stack.penalty_names and not self.stack.shaping_names:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            task_loss = result[0] if return_outputs else result
            loss = regularized_loss(self.stack, model, inputs, None, task_loss)
            return (loss, result[1]) if return_outputs else loss
        # Accelerate's mixed precision wraps the model's forward only: the reference's own calls (its body, its
        # output layer per chunk inside the penalties) need the same autocast to be the model's own outputs.
        with self.accelerator.autocast():
            self.stack.prefetch(inputs)
        task_loss, outputs = self._task_loss_and_outputs(model, inputs, num_items_in_batch)
        with self.accelerator.autocast():
            share = lambda: self._mean_scale(inputs, num_items_in_batch)  # noqa: E731 (asked only with a penalty)
            loss = regularized_loss(self.stack, model, inputs, outputs, task_loss, share)
        return (loss, outputs) if return_outputs else loss

    def _task_loss_and_outputs(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any) -> Any:
        """The task loss and the outputs (with the logits, in the graph) of one forward. TRL's SFTTrainer computes
        its loss through a fused head that makes no logits (and returns those of a second forward, without grad):
        its NLL loss is the model's own loss, which transformers.Trainer.compute_loss computes in one forward. A
        shaped loss is a mean over the micro-batch's positions, weighted as the Trainer weights its own."""
        if self.stack.shaping_names:
            sft = loss_owner(type(self)) == "SFTTrainer"
            loss, outputs = shaped_forward(self.stack, model, {**inputs, "use_cache": False} if sft else inputs)
            return loss * self._mean_scale(inputs, num_items_in_batch), outputs
        if loss_owner(type(self)) == "SFTTrainer":
            return Trainer.compute_loss(self, model, {**inputs, "use_cache": False}, True, num_items_in_batch)
        result = super().compute_loss(model, inputs, True, num_items_in_batch)
        user = users_loss(type(self))
        if user is not None:  # transformers' and TRL's return (loss, outputs); a user's override may not
            check_outputs(result, user, self.stack.penalty_names)
        return result

    def _mean_scale(self, inputs: dict[str, Any], num_items_in_batch: Any) -> float | torch.Tensor:
        """The weight of a mean over this micro-batch's loss positions (each autograd penalty, a shaped task loss),
        so that it is weighted as the Trainer weighs its own task loss. When the Trainer divides the loss by the
        accumulation steps, its task loss is a mean per micro-batch too: 1 (the Trainer's division then scales
        both). When it does not, its task loss is a sum over this micro-batch's loss positions divided by
        num_items_in_batch, the positions of the whole accumulated batch (of all processes, whose losses the Trainer
        then scales by their number): the mean gets its positions' share the same way."""
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func
        if not scaled:  # the Trainer divides the whole loss by the accumulation steps itself
            return 1.0
        if num_items_in_batch is None:  # a compute_loss_func without the count: each micro-batch counts whole
            return 1.0
        labels = inputs["labels"]
        positions = loss_mask(labels).sum()  # as the penalties count them
        processes = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        return positions * processes / num_items_in_batch

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer class and settings over the stack's parameter groups (weight decay, LLRD), with
        the stack's hooks attached; a user-supplied optimizer (Trainer(optimizers=...)) gets the hooks only."""
        self.check_regularized()
        if self.optimizer is None:
            model = self.model if model is None else model
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            groups = self.stack.optimizer_groups(model, kwargs.get("lr", self.args.learning_rate))
            self.optimizer = cls(groups, **kwargs)
        elif self._hooked is None and self.stack.group_names:
            names = ", ".join(self.stack.group_names)
            raise TetherError(
                f"{names} set the optimizer's parameter groups, which a user-supplied optimizer already has: let the "
                "Trainer build it (drop optimizers=..., set optim / learning_rate in the arguments) or drop them"
            )
        if self._hooked is not self.optimizer:
            self.stack.attach(self.model if model is None else model, self.optimizer)
            self._hooked = self.optimizer
        return self.optimizer

    def check_regularized(self) -> None:
        """Refuse, in one line each, what would make a regularizer do nothing or something else than it says."""
        check_trainer(type(self), self.stack)
        owner, shaping = loss_owner(type(self)), self.stack.shaping_names
        on_nll = [n for n in self.stack.names if n in self.stack.penalty_names or n in shaping]
        own_loss = self.compute_loss_func is not None or self.label_smoother is not None
        if on_nll and owner == "SFTTrainer" and (self.args.loss_type != "nll" or own_loss):
            raise ConfigError(
                f"{', '.join(on_nll)} under SFTTrainer take the loss as the model's NLL: set loss_type='nll', no "
                "compute_loss_func and label_smoothing_factor=0 (tether has dft and label_smoothing regularizers)"
            )
        if shaping and own_loss:
            raise ConfigError(
                f"{', '.join(shaping)} weight{'s' if len(shaping) == 1 else ''} the model's cross-entropy, which "
                "compute_loss_func / label_smoothing_factor replace: drop those (tether has a label_smoothing "
                f"regularizer) or drop {', '.join(shaping)}"
            )
        if not self.stack.is_set_up and self.pending_setup is None:
            raise TetherError(set_up_by_hand(type(self), "has a regularizer stack that was never set up"))
        ends = [c for c in self.callback_handler.callbacks if isinstance(c, StepEnd) and c.stack is self.stack]
        if not ends:  # without it a step fp16's scaler skipped leaves its flag to stop the next, healthy one
            raise TetherError(set_up_by_hand(type(self), "has no StepEnd(trainer.stack) callback"))
        self.check_dropout()
        trained = frozenset(id(p) for p in self.model.parameters() if p.requires_grad)
        if self.stack.is_set_up and not self.is_fsdp_enabled and trained != self.stack.set_up_on:
            raise TetherError(
                "the model's trainable parameters changed after the regularizers were set up (adapters added or "
                "parameters frozen since?): install tether after wrapping the model (e.g. after get_peft_model, "
                "or pass peft_config to the TRL trainer and regularize the trainer)"
            )
        weight_decay = self.args.weight_decay
        decayed = next((reg.strength for reg, _ in self.stack.items if reg.name == "weight_decay"), 0.0)
        if weight_decay and self.optimizer is None and decayed != weight_decay:
            raise TetherError(
                f"TrainingArguments.weight_decay={weight_decay} is not what the regularizers decay with: set it to 0 "
                f"and add {{'name': 'weight_decay', 'strength': {weight_decay}}} (tether.regularize does so itself)"
            )

    def check_dropout(self) -> None:
        """TRL's preference and RL trainers switch dropout off on purpose (disable_dropout): tether's dropout
        regularizer would switch it back on behind their back."""
        disabled = getattr(self.args, "disable_dropout", False)  # TRL's configs only: TrainingArguments has none
        if "dropout" in self.stack.names and disabled:
            raise ConfigError(
                f"dropout: {library_trainer(type(self)).__name__} turns dropout off (disable_dropout=True) so that "
                "its loss compares noise-free log-probabilities or rewards: set disable_dropout=False in its config "
                "to use tether's dropout, or remove dropout"
            )

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        """The Trainer calls this after Accelerate has sharded the model (FSDP2 shards it in place) and before it
        loads a checkpoint: the pending setup takes its anchors from the pre-trained weights, on the shards. The
        optimizer exists by then (transformers builds it before sharding under FSDP2): its groups come from the
        model's structure, never from setup (RegularizerStack.param_groups)."""
        if self.pending_setup is not None:
            setup, self.pending_setup = self.pending_setup, None
            if self.is_fsdp_enabled and not has_sharded_parameters(self.model):
                raise TetherError("FSDP did not shard the model's parameters in place: tether needs FSDP2")
            setup()
            if self.resume_state is not None:
                self.stack.load_state_dict(self.resume_state)
                self.resume_state = None
        return super().create_scheduler(num_training_steps, optimizer)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Everything (the stack's state too: EMA average, skipped steps) is written under RUN_DIR/.staging/ and the
        finished checkpoint-N is renamed into place: a kill during a save leaves no checkpoint-N to resume from."""
        self._at_this_step(self.stack.closed_form_values)  # checked per log and save, not per step: see README
        run_dir = Path(self._get_output_dir(trial=trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        # named as the run folder: TRL names the model card it writes beside the checkpoint after output_dir
        staged = run_dir / STAGING / (run_dir.resolve().name or "run") / name  # "." has no name of its own
        if self.args.should_save:
            shutil.rmtree(run_dir / STAGING, ignore_errors=True)  # what a save killed earlier left
            save_safetensors_atomic(self.stack.state_dict(), staged / STACK_STATE)
        barrier()  # the staging folder is there before any process writes its part (rng_state_<rank>.pth)
        output_dir, self.args.output_dir = self.args.output_dir, str(staged.parent)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = output_dir
        barrier()  # every process has written its part
        if self.args.should_save:
            self._commit_checkpoint(staged, run_dir / name)
        barrier()

    def _commit_checkpoint(self, staged: Path, final: Path) -> None:
        """Rename a staged checkpoint into place, then rotate old ones as the Trainer would have."""
        if self.state.best_model_checkpoint == str(staged):  # the Trainer saw the best step in the staging folder
            self.state.best_model_checkpoint = str(final)
            self.state.save_to_json(str(staged / TRAINER_STATE_NAME))
        if final.exists():  # the same step saved again (a resumed run): replace it
            shutil.rmtree(final)
        os.replace(staged, final)
        for left in staged.parent.iterdir():  # what a TRL trainer writes beside the checkpoint (its model card)
            os.replace(left, final.parent / left.name)
        staged.parent.rmdir()
        (final.parent / STAGING).rmdir()
        limit, best = self.args.save_total_limit, self.state.best_model_checkpoint
        rotate_checkpoints(str(final.parent), save_total_limit=limit, best_model_checkpoint=best)

    def _at_this_step(self, terms: Callable[[], dict[str, float]]) -> dict[str, float]:
        """terms() (the stack's `reg/<name>` terms), whose closed-form penalties are valued at the weights this
        step left: a NaN/inf one stops the run naming this step, not the next."""
        try:
            return terms()
        except NonFiniteError as e:
            raise NonFiniteError(str(e), step=self.state.global_step) from None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs get each unweighted `reg/<name>` term next to the loss."""
        if "loss" in logs:
            logs.update(self._at_this_step(self.stack.pop_logs))
        super().log(logs, start_time)


@functools.cache  # asked per micro-batch; a class's MRO does not change
def loss_class(cls: type) -> type:
    """The class whose compute_loss the mixin's super() calls (transformers.Trainer, a TRL trainer, a user's)."""
    return next(c for c in below_mixin(cls) if "compute_loss" in vars(c))


def loss_owner(cls: type) -> str:
    """The name of loss_class ("Trainer" for transformers.Trainer)."""
    return loss_class(cls).__name__


def below_mixin(cls: type) -> tuple[type, ...]:
    """The classes the mixin's super() reaches, in order."""
    mro = cls.__mro__
    return mro[mro.index(RegularizedMixin) + 1 :]


def is_library(cls: type) -> bool:
    """transformers.Trainer or a TRL trainer (whose losses tether knows), not a user's subclass."""
    return cls is Trainer or cls.__module__.split(".")[0] == "trl"


def library_trainer(cls: type) -> type:
    """The transformers or TRL trainer that `cls` builds on (the one whose loss OWN_CONSTRAINT describes)."""
    return next(c for c in below_mixin(cls) if is_library(c))


def users_loss(cls: type) -> str | None:
    """The name of the user's class whose compute_loss the mixin's super() calls; None for the library's own."""
    owner = loss_class(cls)
    return None if is_library(owner) else owner.__name__


def check_outputs(result: Any, user: str, readers: list[str]) -> None:
    """A user's compute_loss asked for return_outputs=True must return (loss, outputs) whose logits are in the graph:
    the autograd penalties read them, and logits without a gradient would make them do nothing."""
    names, read = ", ".join(readers), "reads" if len(readers) == 1 else "read"
    if not isinstance(result, tuple | list) or len(result) != 2:
        what = "a tensor" if isinstance(result, torch.Tensor) else f"a {type(result).__name__}"
        raise ConfigError(
            f"{user}.compute_loss returned {what} where return_outputs=True asks for (loss, outputs): {names} "
            f"{read} the logits from them: return (loss, outputs) when return_outputs is True"
        )
    logits = getattr(result[1], "logits", None)  # a ModelOutput, or whatever the override returned
    if not isinstance(logits, torch.Tensor) or (torch.is_grad_enabled() and not logits.requires_grad):
        raise ConfigError(
            f"{user}.compute_loss returned outputs without logits in the graph: {names} {read} them and would add "
            "no gradient: return the outputs of the forward that makes the loss"
        )


def set_up_by_hand(cls: type, problem: str) -> str:
    """What a trainer that mixes in RegularizedMixin itself must do (what tether.regularize otherwise does)."""
    return (
        f"{cls.__name__} {problem}: a trainer with RegularizedMixin is set up by hand: set trainer.stack = "
        "RegularizerStack.from_configs(...), call trainer.stack.setup(SetupContext(trainer.model, ...)) and "
        f"trainer.add_callback(StepEnd(trainer.stack)) before train(); or build a {library_trainer(cls).__name__} "
        "without the mixin and call tether.regularize(trainer, [...])"
    )


# TRL trainers whose loss is not a per-token loss on labelled tokens, and their own way to hold the model close
OWN_CONSTRAINT = {
    "DPOTrainer": "its beta (the KL to the reference model inside the DPO loss)",
    "GRPOTrainer": "its beta (the KL to the reference model) and epsilon (the ratio clipping)",
    "KTOTrainer": "its beta",
    "RLOOTrainer": "its beta",
    "RewardTrainer": "its center_rewards_coefficient",
}


def check_trainer(cls: type, stack: RegularizerStack) -> None:
    """The autograd penalties compare the model's logits at labelled tokens with the reference's: they need the
    forward that makes the loss (transformers.Trainer, TRL's SFTTrainer); replay mixes labelled rows into the
    training data. Beside a preference or RL loss neither applies: refused, naming what to use instead. The loss
    shaping computes the cross-entropy itself, in place of the trainer's loss: refused beside a user's compute_loss."""
    shaping, user = stack.shaping_names, users_loss(cls)
    if shaping and user is not None:
        names = ", ".join(shaping)
        raise ConfigError(
            f"{names} weight{'s' if len(shaping) == 1 else ''} the model's cross-entropy, which tether computes "
            f"itself in place of the trainer's loss: {user}.compute_loss would never run: drop {names}, or the "
            "compute_loss override"
        )
    owner = library_trainer(cls).__name__  # a user's subclass of DPOTrainer has DPO's loss too
    if owner in ("Trainer", "SFTTrainer"):
        return
    loss_users = {*stack.penalty_names, *shaping, *row_mixers(stack)}
    unfit = [name for name in stack.names if name in loss_users]
    if owner in OWN_CONSTRAINT and unfit:
        # a reward model scores whole rows: no token logits for ewc's Fisher or si's importance either
        anchors = "l2_sp, l1, l2" if owner == "RewardTrainer" else "the parameter-space ones (l2_sp, ewc, si)"
        raise ConfigError(
            f"{', '.join(unfit)} cannot apply beside {owner}'s loss (no labelled tokens to compare or replay): use "
            f"{OWN_CONSTRAINT[owner]} instead, or {anchors}, and drop them"
        )


def row_mixers(stack: RegularizerStack) -> list[str]:
    """The regularizers that change the training rows (replay mixes labelled rows in)."""
    return stack.overriding("train_data")


def load_stack_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The regularizers' state saved with a checkpoint ({} for a checkpoint written without regularizer state)."""
    from safetensors.torch import load_file

    path = checkpoint / STACK_STATE
    return load_file(str(path)) if path.is_file() else {}


class StepEnd(TrainerCallback):
    """Tells the stack that an optimizer step is over, whether or not the optimizer ran (see discard_flags)."""

    def __init__(self, stack: RegularizerStack) -> None:
        self.stack = stack

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.stack.discard_flags()


class RegularizedTrainer(RegularizedMixin, Trainer):
    """transformers.Trainer whose loss, optimizer and logs go through a RegularizerStack."""

    def __init__(self, *args: Any, stack: RegularizerStack, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stack = stack
        self.add_callback(StepEnd(stack))
