"""Regularizers, each registered by name in its own module; importing this package registers them all."""

from tether.regularizers import ewc, l1, l2, l2_sp, llrd, si, weight_decay  # noqa: F401  (registers them)
from tether.regularizers.base import REGISTRY, Regularizer, RegularizerConfig, SetupContext, register
from tether.regularizers.stack import RegularizerStack, parse_entries

__all__ = [
    "REGISTRY",
    "Regularizer",
    "RegularizerConfig",
    "RegularizerStack",
    "SetupContext",
    "parse_entries",
    "register",
]
