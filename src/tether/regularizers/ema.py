"""EMA: an exponential moving average of the trained weights, evaluated and saved as a second final model.

After every optimizer step, avg <- decay * avg + (1 - decay) * theta over the trainable tensors (the adapters and
head under LoRA), in fp32 whatever the model's dtype. With `bias_correction` the average starts at zero and is
divided by 1 - decay^t (as Adam corrects its moments), so it is a weighted mean of the trained weights only; without
it the average starts from the weights at setup, which keep weight decay^t: a pull toward the original model that
fades over the run. After training the average is swapped in, measured like the final model (target.*,
forgetting.*, written to metrics.json under `ema`) and saved to output_dir/model_ema/; then the trained weights are
put back. The average and its step count are in every checkpoint, so a resumed run ends with the same average.
strength is unused.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from pydantic import Field
from torch import nn

from tether.regularizers.anchor import trainable
from tether.regularizers.base import FinishContext, NoPenaltyConfig, Regularizer, SetupContext, nbytes, register


class EMAConfig(NoPenaltyConfig):
    decay: float = Field(0.99, gt=0, lt=1)
    """Weight of the past per step: the average spans about 1 / (1 - decay) steps; take 1/10-1/3 of the run
    (0.99 for a few hundred steps, 0.999 for thousands)."""
    bias_correction: bool = True
    """Start from zero and divide by 1 - decay^t (an average of trained weights only); false: start from the
    original weights."""


@register("ema", EMAConfig)
class EMA(Regularizer):
    sharded_parameters = False  # averages or interpolates whole parameter tensors
    touches_parameters = True

    def __init__(self, config: EMAConfig) -> None:
        self.config = config
        self.params: list[torch.Tensor] = []
        self.shadow: list[torch.Tensor] = []
        self.steps = 0

    def setup(self, ctx: SetupContext) -> None:
        self.params = [p for _, p in trainable(ctx.model)]
        if self.config.bias_correction:
            self.shadow = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        else:
            self.shadow = [p.detach().float().clone() for p in self.params]
        self.steps = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"shadow.{i}": s for i, s in enumerate(self.shadow)}
        return {**state, "steps": torch.tensor(self.steps)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, s in enumerate(self.shadow):
                s.copy_(state[f"shadow.{i}"])
        self.steps = int(state["steps"])

    def memory(self) -> dict[str, int]:
        return {"average": nbytes(self.shadow)}

    def step_end(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.steps += 1
        with torch.no_grad():
            torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - self.config.decay)

    def average(self) -> list[torch.Tensor]:
        """The averaged weights (fp32), bias-corrected when configured; the weights themselves before any step."""
        if self.steps == 0:
            return [p.detach().float() for p in self.params]
        if not self.config.bias_correction:
            return self.shadow
        return torch._foreach_div(self.shadow, 1 - self.config.decay**self.steps)

    def after_training(self, model: nn.Module, ctx: FinishContext) -> dict[str, Any]:
        with swapped(self.params, self.average()):
            metrics = ctx.evaluate(model)
            ctx.save(model, "model_ema")
        return {"decay": self.config.decay, "steps": self.steps, **metrics}


@contextmanager
def swapped(params: list[torch.Tensor], values: list[torch.Tensor]) -> Iterator[None]:
    """The parameters hold `values` (cast to their dtype) inside, their own values again after."""
    kept = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, v in zip(params, values):
                p.copy_(v)
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, kept):
                p.copy_(v)
