"""WiSE-FT: after training, interpolate in weight space between the original and the fine-tuned model.

theta(alpha) = (1 - alpha) * theta_0 + alpha * theta (Wortsman et al., 2022): alpha = 0 is the original model,
1 the fine-tuned one. Each alpha in `alphas` is measured like the final model (target val loss, and with reference
data the forgetting), the table goes to metrics.json under `wise_ft` and the trade-off to wise_ft.png (target loss
against the increase of the reference loss, one point per alpha), and the chosen alpha's model is saved to
output_dir/model_wise_ft/. The main model/ stays the fine-tuned one.

Choice (`choose`):
  least_forgetting  among the alphas whose target val loss is within `tolerance` (relative) of the best one, the
                    one with the lowest reference loss (ties: the larger alpha); without reference data, best_target
  best_target       the alpha with the lowest target val loss
The choice is made on the validation data, so the chosen model's validation loss is slightly optimistic.

Full fine-tuning keeps theta_0, a copy of the trainable weights at setup. Under LoRA the update of a layer is
s * B @ A; interpolating both factors would give alpha^2 terms, so the factor that was zero at setup (B, or A for
embedding adapters) is interpolated and the other keeps its trained value: exactly alpha * delta W (the scaling
of the adapter by alpha). An adapter with neither factor zero at setup (trained before this run) cannot be
interpolated that way: setup stops with an error. Under PEFT's OSF the change of an adapted layer is
U_low S_low V_low - U_low_0 S_low_0 V_low_0; interpolating the three factors would give a cubic in alpha, so the
layer's weight is interpolated instead: for the candidates the change is folded into the weight (W_0 + delta W, as
PEFT's merge computes it) and U_low, S_low, V_low are set to their start, where PEFT's change is exactly zero
(its forward adds the start's product minus itself: zero within rounding); each candidate is then W_0 + alpha *
delta W, exactly in the merged model saved. W_0 of the adapted
layers is the copy kept from setup (memory: start weights), and afterwards the trained factors and W_0 come back
bit for bit. Other trainable tensors (a classification head) are interpolated elementwise. strength is unused.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from tether.errors import ConfigError
from tether.regularizers.anchor import snapshot, trainable
from tether.regularizers.base import FinishContext, NoPenaltyConfig, Regularizer, SetupContext, nbytes, register
from tether.selection import within_tolerance


class WiseFTConfig(NoPenaltyConfig):
    alphas: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Interpolation weights of the fine-tuned model to measure, each in [0, 1] (0: original, 1: fine-tuned)."""
    choose: Literal["least_forgetting", "best_target"] = "least_forgetting"
    """Which alpha's model to save to model_wise_ft/ (see the module docstring)."""
    tolerance: float = Field(0.05, ge=0)
    """least_forgetting: how much worse than the best target val loss is acceptable, relative (0.05: 5%)."""

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, value: list[float]) -> list[float]:
        if not value or any(not 0 <= a <= 1 for a in value):
            raise ValueError("give a non-empty list of alphas, each between 0 and 1")
        return sorted(set(value))


@register("wise_ft", WiseFTConfig)
class WiseFT(Regularizer):
    sharded_parameters = False  # averages or interpolates whole parameter tensors
    touches_parameters = True

    def __init__(self, config: WiseFTConfig) -> None:
        self.config = config
        self.params: list[torch.Tensor] = []
        self.start: list[torch.Tensor] = []

    def setup(self, ctx: SetupContext) -> None:
        self.params = [p for _, p in interpolated(ctx.model)]
        self.start = snapshot(self.params)

    def memory(self) -> dict[str, int]:
        return {"start weights": nbytes(self.start)}

    def after_training(self, model: nn.Module, ctx: FinishContext) -> dict[str, Any]:
        rows = []
        with osf_folded(model, self.params, self.start):
            trained = [p.detach().clone() for p in self.params]
            try:
                for alpha in self.config.alphas:
                    self.interpolate(trained, alpha)
                    rows.append({"alpha": alpha, **summary(ctx.evaluate(model))})
                chosen = choose(rows, self.config.choose, self.config.tolerance)
                self.interpolate(trained, chosen)
                ctx.save(model, "model_wise_ft")
            finally:
                with torch.no_grad():
                    torch._foreach_copy_(self.params, trained)
        plot(rows, chosen, ctx.output_dir / "wise_ft.png")
        return {"alphas": rows, "chosen_alpha": chosen, "choose": applied_rule(rows, self.config.choose)}

    def interpolate(self, trained: list[torch.Tensor], alpha: float) -> None:
        """Set the interpolated tensors to theta(alpha) = theta_0 + alpha * (trained - theta_0), in place."""
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.start)
            torch._foreach_lerp_(self.params, trained, alpha)


def interpolated(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of what moves between the original and the fine-tuned model: every trainable tensor, under
    LoRA with each adapter's factor that was zero at setup only, under OSF each adapted layer's weight in place of
    its factors (module docstring); merge shares it."""
    named = trainable(model)
    layers = osf_layers(model)
    factors = {id(p) for _, layer, adapter in layers for p in layer.osf_svd_params[adapter].values()}
    left_out = lora_factors_to_keep(named) | factors
    weights = [(f"{name}.base_layer.weight", layer.get_base_layer().weight) for name, layer, _ in layers]
    return [(n, p) for n, p in named if id(p) not in left_out] + weights


def osf_layers(model: nn.Module) -> list[tuple[str, Any, str]]:
    """(name, layer, adapter) of each PEFT OSF layer with the model's active adapter; [] for other models."""
    from tether.models import is_osf  # late: tether.models imports the config, which imports the regularizers

    if not is_osf(model):
        return []
    from peft.tuners.osf.layer import OSFLayer

    adapter = model.active_adapter
    return [
        (n, m, adapter) for n, m in model.named_modules() if isinstance(m, OSFLayer) and adapter in m.osf_svd_params
    ]


def osf_start(layer: Any, adapter: str) -> dict[str, torch.Tensor]:
    """U_low, S_low, V_low of an OSF layer at their start (PEFT keeps them to compute the change)."""
    return {"U_low": layer._osf_U_low_init[adapter], "S_low": layer._osf_S_low_init[adapter],
            "V_low": layer._osf_V_low_init[adapter]}  # fmt: skip


@contextmanager
def osf_folded(model: nn.Module, params: list[torch.Tensor], start: list[torch.Tensor]) -> Iterator[None]:
    """Under OSF, while inside: each adapted layer's weight holds W_0 + delta W and its U_low, S_low, V_low their
    start, so that what is written into the weight is the layer's weight (module docstring). On exit the trained
    factors and W_0 (from `start`, the setup copy of `params`) come back bit for bit. Nothing for other models."""
    layers = osf_layers(model)
    factors = [layer.osf_svd_params[adapter] for _, layer, adapter in layers]
    trained = [{k: p.detach().clone() for k, p in f.items()} for f in factors]
    originals = {id(p): s for p, s in zip(params, start)}
    try:
        with torch.no_grad():
            for (_, layer, adapter), f in zip(layers, factors):
                weight = layer.get_base_layer().weight
                weight.copy_((weight + layer.get_delta_weight(adapter)).to(weight.dtype))  # PEFT's merge, exactly
                for key, init in osf_start(layer, adapter).items():  # get_delta_weight is then exactly zero
                    f[key].copy_(init)
        yield
    finally:
        with torch.no_grad():
            for (_, layer, _), f, saved in zip(layers, factors, trained):
                layer.get_base_layer().weight.copy_(originals[id(layer.get_base_layer().weight)])
                for key, p in f.items():
                    p.copy_(saved[key])


def lora_factors_to_keep(named: list[tuple[str, torch.Tensor]]) -> set[int]:
    """ids of the LoRA factors that keep their trained value: in each (A, B) pair, the one whose partner is zero."""
    by_name = dict(named)
    kept = set()
    for name, a in named:
        partner = re.sub(r"\.lora_(embedding_)?A\.", r".lora_\1B.", name)
        if partner == name or partner not in by_name:
            continue
        b = by_name[partner]
        if not b.any():
            kept.add(id(a))
        elif not a.any():
            kept.add(id(b))
        else:
            raise ConfigError(
                f"wise_ft: the adapter {name} was not at its initial value at setup (neither LoRA factor is zero): "
                "wise_ft under LoRA needs an adapter created by this run; remove wise_ft"
            )
    return kept


def summary(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of one alpha's table row: target val loss, reference loss and its increase, fact recall."""
    row = {"val_loss": metrics["target"]["val_loss"]}
    forgetting = metrics.get("forgetting", {})
    if forgetting:
        row.update(reference_loss=forgetting["reference_loss_after"], delta_loss=forgetting["delta_loss"])
    if "recall_after" in forgetting:
        row["recall"] = forgetting["recall_after"]
    return row


def choose(rows: list[dict[str, float]], rule: str, tolerance: float) -> float:
    """The alpha picked by `rule` (module docstring) from the measured rows."""
    return pick(rows, rule, tolerance)["alpha"]


def applied_rule(rows: list[dict[str, Any]], configured: str) -> str:
    """The rule pick() applies: without reference data least_forgetting has nothing to measure, so best_target."""
    return configured if "reference_loss" in rows[0] else "best_target"


def pick(rows: list[dict[str, Any]], rule: str, tolerance: float) -> dict[str, Any]:
    """The row picked by `rule` (module docstring); ties go to the larger alpha (more of the fine-tune kept)."""
    if applied_rule(rows, rule) == "best_target":
        return min(rows, key=lambda r: (r["val_loss"], -r["alpha"]))
    close = within_tolerance(rows, lambda r: r["val_loss"], tolerance)
    return min(close, key=lambda r: (r["reference_loss"], -r["alpha"]))


def plot(rows: list[dict[str, float]], chosen: float, path: Path) -> None:
    """wise_ft.png: target val loss against forgetting (or against alpha without reference data), chosen marked."""
    title = "WiSE-FT: theta(alpha) = (1 - alpha) theta_0 + alpha theta"
    plot_front({"": rows}, lambda r: f"{r['alpha']:g}" + (" (chosen)" if r["alpha"] == chosen else ""), title, path)


def plot_front(series: dict[str, list[dict[str, Any]]], label: Callable[[dict], str], title: str, path: Path,
               joined: set[str] | None = None) -> None:  # fmt: skip
    """Target val loss against forgetting (against alpha without reference data), one series per key (a legend when
    they are named), drawn as a line when in `joined` (None: all) and as points otherwise, each point annotated with
    label(row) when that is not empty (wise_ft, merge)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    forgetting = "delta_loss" in next(iter(series.values()))[0]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in series.items():
        xs = [r["val_loss"] for r in rows]
        ys = [r["delta_loss"] if forgetting else r["alpha"] for r in rows]
        ax.plot(xs, ys, marker="o", label=name or None, linestyle="-" if joined is None or name in joined else "")
        for r, x, y in zip(rows, xs, ys):
            if label(r):
                ax.annotate(label(r), (x, y), fontsize=8)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.set_xlabel("target val loss")
    ax.set_ylabel("reference loss increase (forgetting)" if forgetting else "alpha")
    ax.set_title(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
