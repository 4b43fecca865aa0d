"""The base of every config model and the generic `regularizers:` entry. It imports nothing of tether, so the
regularizer registry (tether.regularizers) and the run config (tether.config) need not import each other: the
config validates its entries through the registry, and the registry's configs build on this."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are frozen, field docstrings are the help."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)


class RegularizerEntry(BaseModel):
    """One `regularizers:` item; its own fields are checked against the registered config class on load."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str
