"""Dropout of the loaded model, set per role: attention, hidden (residual/FFN outputs), embedding, classifier.

Models read their dropout rates from the config when they are built, so changing the config after loading does
nothing by itself: tether sets the config keys (so that a saved model says what it was trained with, and for the
models that read them at each forward, as Falcon does) and every module that holds a rate, an nn.Dropout's p or a
float attribute used with functional dropout (`attention_dropout`, OPT's `dropout`, Falcon's `hidden_dropout`). The
rates act in training mode only; evaluation and the frozen reference run without dropout.

Where each rate lives is found from structure, with no table of model types:
  keys     the config's dropout rates: keys named *dropout*, *pdrop*, *drop_prob* (not layerdrop, not activation
           dropout inside the MLP, which no role names).
  holders  the model is built a second time, on the meta device (no memory, no weights), from a copy of its config
           whose dropout keys hold distinct marker values; a module whose rate comes out as key k's marker reads k.
           Modules whose rate matches no marker (a fixed rate) are holders without a key.
  roles    a holder outside the transformer blocks (llrd.block_list) is `embedding` when it runs before the first
           block and `classifier` when it runs after the last (the order of one probe forward, as for llrd); one
           inside a block is `attention` or `hidden` by the words of its key (attention_probs_dropout_prob, attn_pdrop,
           attention_dropout vs hidden_dropout, resid_pdrop, mlp_dropout; a plain `dropout` is hidden), or of its
           own name when it has no key.
A config key that covers two roles (BERT's hidden_dropout_prob also feeds the embeddings and the classifier; OPT's
dropout the embeddings) is set by the role its name says, or that most of its holders have: a model reloaded from its
saved config then gets that rate in the other places too. A module that a rate of 0 replaced by nn.Identity when the
model was built (ModernBERT's attention output) cannot be given a rate afterwards. Where a model has no holder for a
role that is asked for (Llama has attention dropout only, Mamba none), setup stops with one line naming the roles it
has. Structure cannot tell a rate the forward never reads: the few known ones are in UNUSED, the only table of model
types here, and are refused as missing. The regularizer adds no penalty: strength is unused.
"""

from __future__ import annotations

import copy
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field
from torch import nn

from tether.errors import ConfigError
from tether.reference import hf_model
from tether.regularizers.base import NoPenaltyConfig, Regularizer, SetupContext, base_name, register
from tether.regularizers.llrd import block_list, run_order

log = logging.getLogger(__name__)
ROLES = ("attention", "hidden", "embedding", "classifier")
RATE = re.compile(r"dropout|pdrop|drop_prob")
# The words of a key or module name that tell its role, tried in this order (activation dropout: no role).
WORDS = (
    (None, r"activation|act_drop"),
    ("classifier", r"classif|cls_|pooler|summary"),
    ("embedding", r"emb"),
    ("hidden", r"hidden|resid|mlp|ffn"),
    ("attention", r"attn|attention"),
)
# (model_type, role): (whether the role's holders are never read under this config, why), checked by
# tests/test_architectures.py, which trains each role alone and compares outputs in train and eval mode
UNUSED: dict[tuple[str, str], tuple[Callable[[Any], bool], str]] = {
    ("opt", "embedding"): (lambda c: True, "OPTDecoder.dropout is never applied"),
    ("falcon", "attention"): (
        lambda c: not c.alibi and (c.parallel_attn or c.new_decoder_architecture),
        "Falcon applies attention dropout only with alibi or a sequential (not parallel) attention block",
    ),
}


@dataclass(frozen=True)
class Holder:
    """A module attribute that holds a dropout rate: `p` of an nn.Dropout, or a float attribute."""

    module: str
    """Its module's name in the transformers model (inside PEFT's wrapping: base_name)."""
    attr: str
    key: str | None
    """The config key it was built from (None: a fixed rate)."""


@dataclass
class Knob:
    """What one role changes: config keys and holders."""

    keys: list[str] = field(default_factory=list)
    holders: list[Holder] = field(default_factory=list)


class DropoutConfig(NoPenaltyConfig):
    attention: float | None = Field(None, ge=0, lt=1)
    """Dropout on the attention probabilities; 0.0-0.1 (None: keep the model's)."""
    hidden: float | None = Field(None, ge=0, lt=1)
    """Dropout on the residual branches (attention output, MLP output); 0.1 is common for small data."""
    embedding: float | None = Field(None, ge=0, lt=1)
    """Dropout on the input embeddings; 0.0-0.1."""
    classifier: float | None = Field(None, ge=0, lt=1)
    """Dropout before a sequence-classification head; 0.1-0.3."""


@register("dropout", DropoutConfig)
class Dropout(Regularizer):
    def __init__(self, config: DropoutConfig) -> None:
        self.rates = {role: getattr(config, role) for role in ROLES if getattr(config, role) is not None}

    def setup(self, ctx: SetupContext) -> None:
        if not self.rates:
            log.warning("dropout: no rate is set (attention, hidden, embedding, classifier): the model is unchanged")
        set_dropout(ctx.model, self.rates)


def rate_keys(config: object) -> list[str]:
    """The config's dropout-rate keys (a number or None: unset, as BERT's classifier_dropout)."""
    values = config.to_dict()
    return sorted(k for k, v in values.items() if RATE.search(k) and (v is None or type(v) in (int, float)))


def role_of_words(name: str) -> str | None:
    """The role the words of a key or module name say; '' when they say none."""
    for role, words in WORDS:
        if re.search(words, name):
            return role
    return ""


def find_holders(inner: nn.Module) -> list[Holder]:
    """Every rate holder of the transformers model, each with the config key it was built from (see the module
    docstring: a meta-device build from a config whose keys hold markers)."""
    keys = rate_keys(inner.config)
    markers = {round(0.0001234 + (i + 1) / 997, 9): key for i, key in enumerate(keys)}
    marked = copy.deepcopy(inner.config)
    for value, key in markers.items():
        setattr(marked, key, value)
    try:
        with torch.device("meta"):
            probe = type(inner)(marked)
    except Exception as e:  # the build is a side check: without it, holders are found without their keys
        log.warning("dropout: cannot rebuild %s to find its config keys (%s)", type(inner).__name__, e)
        probe, markers = inner, {}
    holders = []
    for name, module in probe.named_modules():
        if isinstance(module, nn.Dropout):
            holders.append(Holder(name, "p", markers.get(round(module.p, 9))))
        for attr, value in vars(module).items():
            if type(value) is float and RATE.search(attr):
                holders.append(Holder(name, attr, markers.get(round(value, 9))))
    return holders


def knobs(model: nn.Module) -> dict[str, Knob]:
    """{role: its config keys and holders} of the model (PEFT-wrapped or not); roles without a holder are absent."""
    inner = hf_model(model)
    real = {}
    for name, module in inner.named_modules():
        real.setdefault(base_name(f"{name}."), []).append(module)
    prefix = block_list(inner)[0] + "." if any(isinstance(m, nn.ModuleList) for m in inner.modules()) else None
    order = run_order(inner) or {}
    starts = [v for k, v in order.items() if prefix and k.startswith(prefix) and k[len(prefix) :].isdigit()]
    out: dict[str, Knob] = {}
    key_roles: dict[str, list[str]] = {}
    for holder in find_holders(inner):
        modules = [m for m in real.get(f"{holder.module}.", []) if has_rate(m, holder.attr)]
        if not modules:
            continue  # nn.Identity where the rate was 0 at build, or a module the model does not have
        role = holder_role(holder, prefix, order.get(holder.module), starts)
        if role:
            out.setdefault(role, Knob()).holders.append(holder)
            if holder.key is not None:
                key_roles.setdefault(holder.key, []).append(role)
    for key, roles in key_roles.items():
        own = role_of_words(key) or Counter(roles).most_common(1)[0][0]
        if own in out:
            out[own].keys.append(key)
    return {role: out[role] for role in ROLES if role in out and not unused(inner.config, role)}


def unused(config: Any, role: str) -> str | None:
    """Why the role's holders are never read by this model's forward (UNUSED), or None."""
    rule = UNUSED.get((config.model_type, role))
    return rule[1] if rule is not None and rule[0](config) else None


def has_rate(module: nn.Module, attr: str) -> bool:
    return isinstance(module, nn.Dropout) if attr == "p" else type(vars(module).get(attr)) is float


def holder_role(holder: Holder, prefix: str | None, position: int | None, starts: list[int]) -> str | None:
    """embedding / classifier outside the blocks (by when it runs), attention / hidden inside (by its words)."""
    inside = prefix is not None and holder.module.startswith(prefix) and holder.module[len(prefix) :][:1].isdigit()
    if not inside:
        if position is not None and starts:
            return "embedding" if position < min(starts) else "classifier"
        return "classifier" if re.search(WORDS[1][1], holder.module) or holder.module.count(".") == 0 else "embedding"
    words = holder.key if holder.key is not None else holder.module.rsplit(".", 1)[-1] + "." + holder.attr
    role = role_of_words(words)
    return "hidden" if role in ("", "embedding", "classifier") else role


def set_dropout(model: nn.Module, rates: dict[str, float]) -> dict[str, int]:
    """Set each role's rate in the config and in every module that holds it; returns the rates changed per role."""
    inner = hf_model(model)
    found = knobs(model)
    for role in rates:
        if role not in found:
            has = ", ".join(found) or "none"
            why = unused(inner.config, role)
            raise ConfigError(
                f"dropout.{role}: {inner.config.model_type} has no {role} dropout (it has {has}"
                f"{'; ' + why if why else ''}): remove {role}"
            )
    changed = {}
    for role, rate in rates.items():
        knob = found[role]
        for key in knob.keys:
            setattr(inner.config, key, rate)
        wanted = {(h.module, h.attr) for h in knob.holders}
        count = 0
        for name, module in inner.named_modules():
            for attr in {a for m, a in wanted if m == base_name(f"{name}.")[:-1]}:
                if has_rate(module, attr):
                    setattr(module, attr, rate)
                    count += 1
        changed[role] = count
    return changed
