"""Regularizers, each registered by name in its own module; importing this package registers them all."""

from tether.regularizers import (  # noqa: F401  (registers them)
    asft,
    dft,
    distill,
    dropout,
    eaft,
    ema,
    ewc,
    flow,
    intruder,
    kl,
    l1,
    l2,
    l2_sp,
    label_smoothing,
    llrd,
    merge,
    mofo,
    neftune,
    replay,
    self_replay,
    si,
    weight_decay,
    wise_ft,
)
from tether.regularizers.base import (
    REGISTRY,
    FinishContext,
    Regularizer,
    RegularizerConfig,
    RunFacts,
    SetupContext,
    register,
)
from tether.regularizers.stack import RegularizerStack, parse_entries

__all__ = [
    "REGISTRY",
    "FinishContext",
    "Regularizer",
    "RegularizerConfig",
    "RegularizerStack",
    "RunFacts",
    "SetupContext",
    "parse_entries",
    "register",
]
