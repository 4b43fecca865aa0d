"""RegularizedTrainer: transformers.Trainer with the regularizer stack in the loss, the optimizer and the logs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from tether.outputs import save_safetensors_atomic
from tether.regularizers import RegularizerStack

STACK_STATE = "tether_state.safetensors"  # the regularizers' training state in each checkpoint-N/


class RegularizedMixin:
    """Mix into transformers.Trainer (or TRL's SFTTrainer): `class T(RegularizedMixin, SFTTrainer)`, then add the
    StepEnd(stack) callback, as RegularizedTrainer does."""

    stack: RegularizerStack

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        if model.training:
            self.stack.prefetch(inputs)
        task_loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        loss = task_loss
        if model.training:
            penalty = self.stack.penalty(model, inputs, outputs)
            if penalty is not None:
                loss = task_loss + penalty * self._penalty_scale(num_items_in_batch)
            if not torch.isfinite(loss.detach()):  # one device sync per micro-batch; the culprit is found after
                self.stack.flag_non_finite(self._non_finite_term(task_loss))  # the optimizer step stops or skips
        return (loss, outputs) if return_outputs else loss

    def _non_finite_term(self, task_loss: torch.Tensor) -> str:
        if not torch.isfinite(task_loss.detach()):
            return f"the task loss became {task_loss.item()}: lower the learning rate or check the data"
        return self.stack.non_finite_term()

    def _penalty_scale(self, num_items_in_batch: Any) -> float:
        """The penalty counts once per optimizer step: when the Trainer will not divide the loss by the number of
        accumulation steps (the task loss is already normalized over the whole accumulated batch), do it here."""
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func
        return 1.0 / self.current_gradient_accumulation_steps if scaled else 1.0

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer class and settings over the stack's parameter groups (weight decay, LLRD)."""
        if self.optimizer is None:
            model = self.model if model is None else model
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            groups = self.stack.optimizer_groups(model, kwargs.get("lr", self.args.learning_rate))
            self.optimizer = cls(groups, **kwargs)
            self.stack.attach(model, self.optimizer)
        return self.optimizer

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """The stack's state (EMA average, skipped steps) goes into the checkpoint first: the Trainer writes
        trainer_state.json last, and a checkpoint without it is treated as torn on resume."""
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            save_safetensors_atomic(self.stack.state_dict(), folder / STACK_STATE)
        super()._save_checkpoint(model, trial)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs get each unweighted `reg/<name>` term next to the loss."""
        if "loss" in logs:
            logs.update(self.stack.pop_logs())
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
