"""Intruder-dimension reduction (arXiv 2410.21228, through PEFT's reduce_intruder_dimension): after a LoRA run, the
singular directions of the merged weights that resemble none of the pre-trained weights' top ones ("intruder
dimensions", which the paper ties to forgetting) are scaled down, and the adapter is refit to its rank. No
retraining: like ema it is a second final model, measured (target.*, forgetting.*: metrics.json under `intruder`)
and saved to output_dir/model_intruder/ (an adapter of the same rank, loaded as model/ is); model/ stays the trained
adapter. PEFT writes the reduced adapter as a second adapter; tether swaps its LoRA factors into the trained one for
the measurement and the save (so the classifier head and other modules_to_save stay the trained ones), then removes
it. LoRA only.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from tether.regularizers.base import FinishContext, NoPenaltyConfig, Regularizer, RunFacts, register
from tether.regularizers.ema import swapped

REDUCED = "tether_intruder_reduced"  # the adapter PEFT writes the reduced factors into


class IntruderConfig(NoPenaltyConfig):
    top_k: int = Field(10, ge=1)
    """The top singular directions of each merged weight checked for intruders."""
    threshold: float = Field(0.5, gt=0, lt=1)
    """A direction whose largest |cosine| with the pre-trained singular vectors is below this is an intruder."""
    mitigation: float = Field(0.75, ge=0, le=1)
    """lambda: the share of each intruder direction kept (PEFT computes W + (lambda - 1) * intruder): 1 changes
    nothing, 0 removes them; lower recovers more of what was forgotten and costs more target."""

    def check_run(self, run: RunFacts) -> str | None:
        if run.adapter != "lora":
            return (
                "intruder reduces a LoRA adapter's intruder dimensions: train with LoRA (a `lora:` section, or the "
                "trainer's peft_config under tether.regularize) or remove intruder"
            )
        return None


@register("intruder", IntruderConfig)
class Intruder(Regularizer):
    sharded_parameters = False  # SVDs of whole weight matrices
    touches_parameters = True

    def __init__(self, config: IntruderConfig) -> None:
        self.config = config

    def after_training(self, model: nn.Module, ctx: FinishContext) -> dict[str, Any]:
        trained, reduced = reduced_factors(model, self.config)
        changed = sum(not torch.equal(a, b) for a, b in zip(trained, reduced))
        with swapped(trained, reduced):
            metrics = ctx.evaluate(model)
            ctx.save(model, "model_intruder")
        return {**self.config.model_dump(exclude={"name", "strength"}), "changed_factors": changed, **metrics}


def reduced_factors(model: nn.Module, cfg: IntruderConfig) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
    """The active adapter's LoRA factors and PEFT's reduced values for them (the model is left as it was)."""
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    active = model.active_adapter
    factors = {n: p for n, p in model.named_parameters() if f".{active}." in n and ".lora_" in n}
    reduce_intruder_dimension(
        model, active, REDUCED, cfg.top_k, cfg.threshold, cfg.mitigation, logging_sink=None
    )  # fmt: skip
    try:
        new = dict(model.named_parameters())
        values = [new[n.replace(f".{active}.", f".{REDUCED}.")].detach().clone() for n in factors]
    finally:
        model.set_adapter(active)
        model.delete_adapter(REDUCED)
    return list(factors.values()), values
