"""Layer-wise learning-rate decay: lr_scale = decay ** (depth_max - depth), the layers nearest the input learn slowest.

Depths: the embeddings (every parameter of an nn.Embedding, and anything the model lists before its first block) are
depth 0, transformer block i is depth i + 1, and everything after the blocks (final norm, LM or classification head,
pooler) is depth_max = num_blocks + 1 and keeps the full learning rate. The blocks are found without per-model code:
they are the nn.ModuleList holding the most parameters (model.layers, transformer.h, gpt_neox.layers,
encoder.layer, ...), and a parameter's block is the index that follows that list's name in its own name, which also
holds under PEFT's wrapping (base_model.model.model.layers.3...). Each incoming group is split by depth and keeps its
other settings (weight decay), so the order of llrd and weight_decay in the list does not matter. Parameters that
loading initialized (the stack's "new" group: a fresh classification head) keep the full learning rate wherever
they sit: they have nothing pre-trained to preserve.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import nn

from tether.errors import ConfigError
from tether.regularizers.base import NoPenaltyConfig, Regularizer, SetupContext, named_params_with_module, register


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


def depths(model: nn.Module) -> tuple[dict[int, int], int]:
    """({id(parameter): depth}, depth_max) for every parameter of the model."""
    prefix, blocks = block_list(model)
    prefix = f"{prefix}." if prefix else ""
    head = len(blocks) + 1
    out: dict[int, int] = {}
    seen_block = False
    for name, param, module in named_params_with_module(model):
        if name.startswith(prefix):
            seen_block = True
            out[id(param)] = int(name[len(prefix) :].split(".", 1)[0]) + 1
        elif isinstance(module, nn.Embedding) or not seen_block:
            out[id(param)] = 0
        else:
            out[id(param)] = head
    return out, head


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
