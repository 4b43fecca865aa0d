"""Layer-wise learning-rate decay: lr_scale = decay ** (depth_max - depth), the layers nearest the input learn slowest.

Depths follow the order the modules run, seen in one probe forward (a short token sequence, under no_grad in eval
mode, the RNG state and every module's mode restored): transformer block i is depth i + 1; a module that runs before
the first block (the embeddings) is depth 0; one that runs after the blocks (a final norm, the LM or classification
head, a pooler) is depth_max = num_blocks + 1 and keeps the full learning rate, wherever the model declares it (OPT
declares its final norm before the blocks, XLM-RoBERTa its classifier before the encoder). The blocks are the
nn.ModuleList holding the most parameters (model.layers, transformer.h, encoder.layer, ...), and a parameter's block
is the index after that list's name in its own name, which also holds under PEFT's wrapping.

A tensor that several modules hold takes the smallest depth among them: input and output embeddings tied into one
matrix get the embeddings' (slowest) lr, since a fast change of that matrix moves the input of every block, which
is what llrd is there to prevent. Modules the probe does not reach, and every module when the probe cannot run
(FSDP2 shards and ZeRO-3 partitions, whose forward gathers collectively; a model the probe input does not fit),
fall back to declaration order: nn.Embedding and whatever is declared before the blocks at depth 0, the rest after
them at depth_max. Each incoming group is split by depth and keeps its other settings (weight decay), so the order
of llrd and weight_decay in the list does not matter.
Parameters that loading initialized (the stack's "new" group: a fresh classification head) keep the full learning
rate wherever they sit: they have nothing pre-trained to preserve.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from pydantic import Field
from torch import nn

from tether.distributed import gathers_per_module, has_sharded_parameters
from tether.errors import ConfigError
from tether.reference import evaluating, probe_ids
from tether.regularizers.base import NoPenaltyConfig, Regularizer, SetupContext, register

log = logging.getLogger(__name__)


class LLRDConfig(NoPenaltyConfig):
    decay: float = Field(0.9, gt=0, le=1)
    """lr multiplier per block going down from the head; 0.8-0.95 is typical (1 turns llrd off)."""


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, module) of the transformer blocks: the nn.ModuleList holding the most parameters."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    sizes = [sum(p.numel() for p in m.parameters()) for _, m in lists]
    if not lists or max(sizes) == 0:
        raise ConfigError(
            f"llrd: found no nn.ModuleList of transformer blocks in {type(model).__name__}; llrd needs a model "
            "whose blocks are one (model.layers, transformer.h, encoder.layer, ...): remove llrd for this model"
        )
    return lists[sizes.index(max(sizes))]


def run_order(model: nn.Module) -> dict[str, int] | None:
    """{module name: position of its first call} in one probe forward; None when the probe cannot run. Cheap (eight
    tokens), under no_grad and eval mode, with the RNG state and each module's training mode restored after."""
    if has_sharded_parameters(model) or gathers_per_module(model):  # FSDP2 / ZeRO-3 forwards gather collectively
        return None
    order: dict[str, int] = {}

    def seen(name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:  # must return None: a value would replace the arguments
            order.setdefault(name, len(order))

        return hook

    handles = [m.register_forward_pre_hook(seen(name)) for name, m in model.named_modules()]
    ids = probe_ids(model)
    devices = [ids.device] if ids.device.type == "cuda" else []
    try:
        with torch.no_grad(), evaluating(model), torch.random.fork_rng(devices=devices):
            model(input_ids=ids)
    except Exception as e:  # any failure of a side probe: fall back, and say why
        log.warning("llrd: the probe forward failed (%s: %s); depths follow declaration order", type(e).__name__, e)
        return None
    finally:
        for handle in handles:
            handle.remove()
    return order


def holders(model: nn.Module) -> dict[int, tuple[nn.Parameter, list[tuple[str, nn.Module]]]]:
    """{id(parameter): (parameter, [(name, module) of every module holding it directly])}: tied tensors have two."""
    out: dict[int, tuple[nn.Parameter, list[tuple[str, nn.Module]]]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            out.setdefault(id(p), (p, []))[1].append((name, module))
    return out


def depths(model: nn.Module) -> tuple[dict[int, int], int]:
    """({id(parameter): depth}, depth_max) for every parameter of the model."""
    prefix, blocks = block_list(model)
    prefix = f"{prefix}." if prefix else ""
    head = len(blocks) + 1
    order = run_order(model) or {}
    starts = sorted(order[f"{prefix}{i}"] for i in range(len(blocks)) if f"{prefix}{i}" in order)
    declared = [name for name, _ in model.named_modules()]
    first_block = declared.index(f"{prefix}0") if f"{prefix}0" in declared else 0

    def depth_of(name: str, module: nn.Module) -> int:
        if name.startswith(prefix) and name[len(prefix) :].split(".", 1)[0].isdigit():
            return int(name[len(prefix) :].split(".", 1)[0]) + 1
        if name in order and starts:
            return sum(start < order[name] for start in starts) if order[name] < starts[-1] else head
        if isinstance(module, nn.Embedding) or declared.index(name) < first_block:
            return 0
        return head

    return {key: min(depth_of(n, m) for n, m in held) for key, (_, held) in holders(model).items()}, head


def depth_table(model: nn.Module) -> dict[int, list[str]]:
    """{depth: names of the modules holding parameters at that depth} (a block counts as one), for `tether inspect`."""
    prefix, _ = block_list(model)
    depth, _ = depths(model)
    table: dict[int, list[str]] = {}
    for key, (_, held) in holders(model).items():
        name = held[0][0]
        if prefix and name.startswith(f"{prefix}."):
            name = ".".join(name.split(".")[: prefix.count(".") + 2])
        names = table.setdefault(depth[key], [])
        if name not in names:
            names.append(name)
    return dict(sorted(table.items()))


@register("llrd", LLRDConfig)
class LLRD(Regularizer):
    """Optimizer-level: splits each group by depth and multiplies its lr_scale."""

    def __init__(self, config: LLRDConfig) -> None:
        self.decay = config.decay

    def setup(self, ctx: SetupContext) -> None:
        block_list(ctx.model)  # a model without blocks is refused before training, not when the optimizer is built

    def param_groups(self, model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        depth, head = depths(model)
        out = []
        for g in groups:
            if g["new"]:  # initialized at loading: full lr
                out.append(g)
                continue
            by_depth: dict[int, list[nn.Parameter]] = {}
            for p in g["params"]:
                by_depth.setdefault(depth.get(id(p), head), []).append(p)
            for d, params in sorted(by_depth.items()):
                scale = g["lr_scale"] * self.decay ** (head - d)
                out.append({**g, "params": params, "lr_scale": scale, "group": f"{g['group']}/depth{d}"})
        return out
