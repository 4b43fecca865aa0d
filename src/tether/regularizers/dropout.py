"""Dropout of the loaded model, set per role: attention, hidden (residual/FFN outputs), embedding, classifier.

Models read their dropout rates from the config when they are built, so changing the config after loading does
nothing by itself: tether sets the config keys (so that a saved model says what it was trained with) and every
module that holds a rate, the nn.Dropout modules' p and the attention modules' float `attention_dropout`. The rates
act in training mode only; evaluation and the frozen reference run without dropout. Where an architecture has no
dropout for a role that is asked for, setup stops with an error naming the roles it has, rather than doing nothing.

What the architectures have (transformers 5):
  llama, mistral, mixtral, qwen2, qwen3, gemma, gemma2   attention only (no residual, MLP or embedding dropout)
  phi3       attention, hidden (resid_pdrop: after attention and after the MLP)
  phi        attention, hidden (resid_pdrop), embedding (embd_pdrop)
  gpt2       attention (attn_pdrop), hidden (resid_pdrop: attention output and MLP), embedding (embd_pdrop)
  gpt_neox   attention, hidden (hidden_dropout: after attention and MLP), embedding (no own key: hidden_dropout)
  bert, roberta  attention (attention_probs_dropout_prob), hidden (hidden_dropout_prob), embedding (no own key:
             hidden_dropout_prob), classifier (classifier_dropout, sequence classification heads)
A config key that covers two roles (BERT's and GPT-NeoX's embeddings) is set by the hidden rate only, so a model
reloaded from its saved config gets the embedding dropout of its hidden rate. Other architectures: add a row.
The regularizer adds no penalty: strength is unused.
"""

from __future__ import annotations

import logging
import re

from pydantic import Field
from torch import nn

from tether.errors import ConfigError
from tether.reference import is_peft
from tether.regularizers.base import NoPenaltyConfig, Regularizer, SetupContext, register

log = logging.getLogger(__name__)
ROLES = ("attention", "hidden", "embedding", "classifier")

# role -> (config keys, module names relative to the transformers model (regex), attribute holding the rate)
Knob = tuple[tuple[str, ...], str, str]
ATTENTION_FLOAT: Knob = (("attention_dropout",), r".*\.self_attn", "attention_dropout")
BERT: dict[str, Knob] = {
    "attention": (("attention_probs_dropout_prob",), r".*\.attention\.self\.dropout", "p"),
    "hidden": (("hidden_dropout_prob",), r".*\.(attention\.output|layer\.\d+\.output)\.dropout", "p"),
    "embedding": ((), r".*\.embeddings\.dropout", "p"),
    "classifier": (("classifier_dropout",), r"dropout|classifier\.dropout", "p"),
}
LLAMA_LIKE = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2")
KNOBS: dict[str, dict[str, Knob]] = {
    **{t: {"attention": ATTENTION_FLOAT} for t in LLAMA_LIKE},
    "phi3": {"attention": ATTENTION_FLOAT, "hidden": (("resid_pdrop",), r".*\.resid_(attn|mlp)_dropout", "p")},
    "phi": {
        "attention": ATTENTION_FLOAT,
        "hidden": (("resid_pdrop",), r".*\.resid_dropout", "p"),
        "embedding": (("embd_pdrop",), r".*\.embed_dropout", "p"),
    },
    "gpt2": {
        "attention": (("attn_pdrop",), r".*\.attn\.attn_dropout", "p"),
        "hidden": (("resid_pdrop",), r".*\.(attn\.resid_dropout|mlp\.dropout)", "p"),
        "embedding": (("embd_pdrop",), r"transformer\.drop", "p"),
    },
    "gpt_neox": {
        "attention": (("attention_dropout",), r".*\.attention", "attention_dropout"),
        "hidden": (("hidden_dropout",), r".*\.post_(attention|mlp)_dropout", "p"),
        "embedding": ((), r".*\.emb_dropout", "p"),
    },
    "bert": BERT,
    "roberta": BERT,
}


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


def set_dropout(model: nn.Module, rates: dict[str, float]) -> dict[str, int]:
    """Set each role's rate in the config and in every module that holds it; returns the modules changed per role."""
    inner = model.get_base_model() if is_peft(model) else model
    model_type = inner.config.model_type
    if model_type not in KNOBS:
        raise ConfigError(
            f"dropout: tether does not know where {model_type} keeps its dropout (it knows {', '.join(KNOBS)}): "
            "remove the dropout regularizer, or add the architecture to KNOBS in tether/regularizers/dropout.py"
        )
    knobs, changed = KNOBS[model_type], {}
    for role, rate in rates.items():
        if role not in knobs:
            raise ConfigError(
                f"dropout.{role}: {model_type} has no {role} dropout (it has {', '.join(knobs)}): remove {role}"
            )
        keys, pattern, attr = knobs[role]
        for key in keys:
            setattr(inner.config, key, rate)
        modules = [m for name, m in inner.named_modules() if re.fullmatch(pattern, name)]
        if not modules or (attr == "p" and not all(isinstance(m, nn.Dropout) for m in modules)):
            raise ConfigError(
                f"dropout.{role}: found no {attr} to set in {type(inner).__name__} (modules {pattern}): this "
                "transformers version names them differently; update KNOBS in tether/regularizers/dropout.py"
            )
        for module in modules:
            setattr(module, attr, rate)
        changed[role] = len(modules)
    return changed
