"""tether: fine-tune a pre-trained language model on a small dataset without overfitting or forgetting.

The Python API (see the README's "Python API"): `regularize` installs regularizers into an existing transformers or
TRL trainer, `knowledge` / `forgetting` measure what a model knows of some rows and how much of it was lost,
`finish` runs ema's and wise_ft's end-of-run models, `model_card` writes the README of a saved model. Names are
imported on first use, so that `import tether` (and the CLI's start) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "regularize": "tether.api",
    "finish": "tether.api",
    "knowledge": "tether.api",
    "forgetting": "tether.api",
    "model_card": "tether.card",
    "RegularizedTrainer": "tether.trainer",
    "RegularizedMixin": "tether.trainer",
    "StepEnd": "tether.trainer",
    "RegularizerStack": "tether.regularizers",
    "SetupContext": "tether.regularizers",
    "TetherError": "tether.errors",
    "ConfigError": "tether.errors",
}
__all__ = [
    "ConfigError",
    "RegularizedMixin",
    "RegularizedTrainer",
    "RegularizerStack",
    "SetupContext",
    "StepEnd",
    "TetherError",
    "__version__",
    "finish",
    "forgetting",
    "knowledge",
    "model_card",
    "regularize",
]

if TYPE_CHECKING:
    from tether.api import finish, forgetting, knowledge, regularize
    from tether.card import model_card
    from tether.errors import ConfigError, TetherError
    from tether.regularizers import RegularizerStack, SetupContext
    from tether.trainer import RegularizedMixin, RegularizedTrainer, StepEnd


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tether' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
