"""RegularizedTrainer: transformers.Trainer with the regularizer stack in the loss, the optimizer and the logs."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from tether.data import IGNORE
from tether.distributed import barrier, has_sharded_parameters
from tether.errors import NonFiniteError, TetherError
from tether.outputs import save_safetensors_atomic
from tether.regularizers import RegularizerStack
from tether.step import regularized_loss

STACK_STATE = "tether_state.safetensors"  # the regularizers' training state in each checkpoint-N/
STAGING = ".staging"  # checkpoints are written here, then renamed into the run directory


class RegularizedMixin:
    """Mix into transformers.Trainer (or TRL's SFTTrainer): `class T(RegularizedMixin, SFTTrainer)`, then add the
    StepEnd(stack) callback, as RegularizedTrainer does."""

    stack: RegularizerStack
    pending_setup: Callable[[], None] | None = None
    """The stack's setup, when it must wait until FSDP has sharded the model (tether.run sets it)."""

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Steps 1-3 of tether.step: prefetch, the Trainer's own task loss, the weighted autograd penalties."""
        if not model.training:  # evaluation never adds penalties
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Accelerate's mixed precision wraps the model's forward only: the reference's own calls (its body, its
        # output layer per chunk inside the penalties) need the same autocast to be the model's own outputs.
        with self.accelerator.autocast():
            self.stack.prefetch(inputs)
        task_loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        with self.accelerator.autocast():
            share = lambda: self._penalty_scale(inputs, num_items_in_batch)  # noqa: E731 (asked only with a penalty)
            loss = regularized_loss(self.stack, model, inputs, outputs, task_loss, share)
        return (loss, outputs) if return_outputs else loss

    def _penalty_scale(self, inputs: dict[str, Any], num_items_in_batch: Any) -> float | torch.Tensor:
        """The weight of this micro-batch's autograd penalties (each a mean over its loss positions), so that they
        are weighted as the task loss is. When the Trainer divides the loss by the accumulation steps, the task loss
        is a mean per micro-batch: 1/GA. When it does not, the task loss is a sum over this micro-batch's loss
        positions divided by num_items_in_batch, the positions of the whole accumulated batch (of all processes,
        whose losses the Trainer then scales by their number): the penalty gets its positions' share the same way."""
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func
        if not scaled:  # outside train() (a direct compute_loss call) the Trainer has no current count yet
            steps = (
                self.current_gradient_accumulation_steps if self.is_in_train else self.args.gradient_accumulation_steps
            )
            return 1.0 / steps
        if num_items_in_batch is None:  # a compute_loss_func without the count: each micro-batch counts whole
            return 1.0
        labels = inputs["labels"]
        positions = (labels[:, 1:] if labels.ndim > 1 else labels).ne(IGNORE).sum()  # as the penalties shift them
        processes = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        return positions * processes / num_items_in_batch

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer class and settings over the stack's parameter groups (weight decay, LLRD)."""
        if self.optimizer is None:
            model = self.model if model is None else model
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            groups = self.stack.optimizer_groups(model, kwargs.get("lr", self.args.learning_rate))
            self.optimizer = cls(groups, **kwargs)
            self.stack.attach(model, self.optimizer)
        return self.optimizer

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
        return super().create_scheduler(num_training_steps, optimizer)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Everything (the stack's state too: EMA average, skipped steps) is written under RUN_DIR/.staging/ and the
        finished checkpoint-N is renamed into place: a kill during a save leaves no checkpoint-N to resume from."""
        self._at_this_step(self.stack.closed_form_values)  # checked per log and save, not per step: see README
        run_dir = Path(self._get_output_dir(trial=trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged = run_dir / STAGING / name
        if self.args.should_save:
            shutil.rmtree(staged.parent, ignore_errors=True)  # what a save killed earlier left
            save_safetensors_atomic(self.stack.state_dict(), staged / STACK_STATE)
        barrier()  # the staging folder is there before any process writes its part (rng_state_<rank>.pth)
        output_dir, self.args.output_dir = self.args.output_dir, str(run_dir / STAGING)
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
        staged.parent.rmdir()
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
