"""Regularizers, each registered by name in its own module; importing this package registers them all."""

from tether.regularizers import l2, weight_decay  # noqa: F401  (registration happens at import)
from tether.regularizers.base import REGISTRY, Regularizer, RegularizerConfig, SetupContext, register
from tether.regularizers.stack import RegularizerStack, parse_entries

__all__ = ["REGISTRY", "Regularizer", "RegularizerConfig", "RegularizerStack", "SetupContext", "parse_entries", "register"]
