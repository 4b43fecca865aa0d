"""`tether inspect`: what a run will do, without training.

Loads the model as `tether train` does (load_model, apply_lora or apply_osf, the regularizer stack from the config)
and reports from the model's structure: the optimizer groups (lr, weight decay, tensors), the llrd depth of each
block, the dropout knobs set, the parameters that loading initialized (new heads), the tensors the pulls toward the
pre-trained weights anchor, the frozen reference's form and the trainable parameters. Nothing is trained or written;
the model is a throwaway copy, so the dropout rates are set on it to show where they land (and refused as train
refuses them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from tether.config import RunConfig
from tether.data import run_labels
from tether.models import apply_lora, apply_osf, fused_experts, load_model
from tether.reference import Reference, evaluating, hf_model, is_peft, merge_options
from tether.regularizers import RegularizerStack, parse_entries
from tether.regularizers.anchor import trainable
from tether.regularizers.base import base_name
from tether.regularizers.dropout import Dropout, knobs, set_dropout
from tether.regularizers.ewc import EWC
from tether.regularizers.l2_sp import L2SP, lora_groups
from tether.regularizers.llrd import LLRD, block_list, depth_table, depths
from tether.regularizers.si import SI


def inspect_run(cfg: RunConfig) -> dict[str, Any]:
    """The plan of a run as a JSON-ready dict (see the module docstring); raises what train would raise."""
    from tether.run import training_args

    args = training_args(cfg, Path(cfg.output_dir))
    model, _, new = load_model(cfg.model, cfg.task, run_labels(cfg))  # the classes train uses
    if cfg.lora is not None:  # CorDA's start needs its calibration pass; the structure is the default init's
        model = apply_lora(model, cfg.lora.model_copy(update={"init": "default"}), cfg.task)
    if cfg.osf is not None:
        model = apply_osf(model, cfg.osf, cfg.task)
    stack = RegularizerStack.from_configs(parse_entries(cfg.regularizers), cfg.skip_non_finite, new)
    regs = [reg for reg, _ in stack.items]
    corda = cfg.lora is not None and cfg.lora.init != "default"
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return {
        "model": {
            "type": hf_model(model).config.model_type,
            "class": type(hf_model(model)).__name__,
            "task": cfg.task,
            "lora": cfg.lora is not None,
            "lora_init": None if cfg.lora is None else cfg.lora.init,
            "osf": osf_plan(model) if cfg.osf is not None else None,
            "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        },
        "trainable": {"parameters": sum(p.numel() for _, p in trained), "tensors": len(trained)},
        "new_parameters": sorted(new),
        "fused_experts_without_adapter": [f"{m}.{p}" for m, p in fused_experts(model)] if is_peft(model) else [],
        "optimizer_groups": optimizer_groups(stack, model, args.learning_rate),
        "llrd": llrd_plan(model, next((r for r in regs if isinstance(r, LLRD)), None)),
        "dropout": dropout_plan(model, next((r for r in regs if isinstance(r, Dropout)), None)),
        "anchored": anchored(model, [r for r in regs if isinstance(r, L2SP | EWC | SI)], new),
        "reference": reference_plan(model, [o for r in regs if (o := r.reference_options()) is not None], corda),
    }


def osf_plan(model: nn.Module) -> dict[str, Any]:
    """OSF's split of each adapted weight: how many layers, their frozen (top) and trained singular directions."""
    from peft.tuners.osf.layer import OSFLayer

    layers = [m for m in model.modules() if isinstance(m, OSFLayer)]
    active = model.active_adapter
    frozen = sum(m.effective_rank[active] for m in layers)
    trained = sum(m.osf_svd_params[active]["S_low"].numel() for m in layers)
    return {"layers": len(layers), "frozen_directions": frozen, "trained_directions": trained}


def optimizer_groups(stack: RegularizerStack, model: nn.Module, lr: float) -> list[dict[str, Any]]:
    """The groups the optimizer will get, as the trainer builds them (RegularizerStack.optimizer_groups)."""
    return [
        {"group": g["group"], "lr": g["lr"], "weight_decay": g["weight_decay"], "tensors": len(g["params"]),
         "parameters": sum(p.numel() for p in g["params"])}
        for g in stack.optimizer_groups(model, lr)
    ]  # fmt: skip


def llrd_plan(model: nn.Module, llrd: LLRD | None) -> dict[str, Any] | None:
    """Each depth's lr scale and the modules at it (a block counts as one)."""
    if llrd is None:
        return None
    _, head = depths(model)
    table = depth_table(model)
    rows = [{"depth": d, "lr_scale": llrd.decay ** (head - d), "modules": names} for d, names in table.items()]
    return {"decay": llrd.decay, "blocks": block_list(model)[0], "depth_max": head, "depths": rows}


def dropout_plan(model: nn.Module, dropout: Dropout | None) -> dict[str, Any] | None:
    """Each asked role's rate, the config keys and the module attributes it sets (refused as setup refuses)."""
    if dropout is None:
        return None
    found = knobs(model)
    set_dropout(model, dropout.rates)  # the throwaway model: the same refusals as setup
    return {
        role: {
            "rate": rate,
            "config_keys": found[role].keys,
            "modules": [f"{h.module}.{h.attr}" for h in found[role].holders],
        }
        for role, rate in dropout.rates.items()
    }


def anchored(model: nn.Module, regs: list[Any], new: frozenset[str]) -> dict[str, Any] | None:
    """What the pulls toward the pre-trained weights hold theta_0 of: tensors elementwise, and under LoRA (l2_sp)
    the adapted layers whose change is pulled (fused experts one by one)."""
    if not regs:
        return None
    pairs = lora_groups(model) if any(isinstance(r, L2SP) for r in regs) else []
    in_pairs = {id(p) for g in pairs for p in (*g.a, *g.b)}
    names = [base_name(n) for n, p in trainable(model, new) if id(p) not in in_pairs]
    return {
        "by": [r.name for r in regs],
        "tensors": names,
        "lora_layers": sum(len(g.a) for g in pairs),
        "lora_experts": sum(len(g.a) * g.experts for g in pairs if g.experts > 1),
        "not_anchored": sorted(new),
    }


def reference_plan(model: nn.Module, options: list[Any], corda: bool = False) -> dict[str, Any] | None:
    """The frozen reference's mode (disable / clone / copy) and whether its output layer runs apart (split). A CorDA
    start moves part of each base weight into its adapter, so adapters off is not the original there: auto clones."""
    if not options:
        return None
    merged = merge_options(options)
    if is_peft(model):
        ref = Reference.build(model, merged)  # no copy under LoRA: the model itself, or its adapter cloned
        mode = "clone" if corda and merged.adapter == "auto" else ref.mode
        return {"mode": mode, "split": ref.split, "output": "split output layer" if ref.split else "whole model"}
    ref = Reference(model, "copy", frozen=model)  # the copy would equal the model now: probe the model itself
    with evaluating(model):  # as the frozen copy always is
        split = ref.splits_exactly()
    return {"mode": "copy", "split": split, "output": "split output layer" if split else "whole model"}


def render(plan: dict[str, Any]) -> list[str]:
    """The plan as short lines for the terminal."""
    m, t = plan["model"], plan["trainable"]
    how = "LoRA" if m["lora"] else "full fine-tuning"
    if m["osf"] is not None:
        o = m["osf"]
        how = (
            f"OSF ({o['layers']} layers, {o['frozen_directions']:,} singular directions frozen, "
            f"{o['trained_directions']:,} trained orthogonally to them)"
        )
    lines = [
        f"model: {m['type']} ({m['class']}), {m['task']}, {how}; {m['parameters']:,} parameters, "
        f"{t['parameters']:,} trainable in {t['tensors']} tensors"
    ]
    if plan["new_parameters"]:
        lines.append(f"new (initialized by loading, full lr, not anchored): {', '.join(plan['new_parameters'])}")
    if plan["fused_experts_without_adapter"]:
        lines.append(f"fused experts without an adapter: {', '.join(plan['fused_experts_without_adapter'])}")
    lines.append("optimizer groups:")
    for g in plan["optimizer_groups"]:
        lines.append(
            f"  {g['group']:<24} lr {g['lr']:.3g}  weight_decay {g['weight_decay']:g}  {g['tensors']} tensors "
            f"({g['parameters']:,} parameters)"
        )
    if plan["llrd"] is not None:
        lines.append(f"llrd (decay {plan['llrd']['decay']:g}, blocks {plan['llrd']['blocks']}):")
        for row in plan["llrd"]["depths"]:
            lines.append(f"  depth {row['depth']} x{row['lr_scale']:.3g}: {', '.join(row['modules'])}")
    for role, knob in (plan["dropout"] or {}).items():
        keys = ", ".join(knob["config_keys"]) or "no config key"
        lines.append(f"dropout {role} {knob['rate']:g}: {keys}; {len(knob['modules'])} modules")
    if plan["anchored"] is not None:
        a = plan["anchored"]
        lora = f", {a['lora_layers']} LoRA layers by their change" if a["lora_layers"] else ""
        experts = f" ({a['lora_experts']} experts one by one)" if a["lora_experts"] else ""
        lines.append(f"anchored ({', '.join(a['by'])}): {len(a['tensors'])} tensors{lora}{experts}")
    if plan["reference"] is not None:
        lines.append(f"reference: {plan['reference']['mode']}, {plan['reference']['output']}")
    return lines
