"""Choosing within a tolerance: the rule WiSE-FT's alpha, the sweep's chosen model and the benchmark's best strength
share, so that "within 5% of the best" means the same thing everywhere."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


def within_tolerance(
    items: Iterable[T], score: Callable[[T], float], tolerance: float, reference: float | None = None
) -> list[T]:
    """The items whose score (lower is better) is at most `reference + tolerance * abs(reference)`, in their order.

    The reference defaults to the lowest score, so that the result then holds at least that item and its ties. abs()
    keeps the band above the reference when scores are negative (a maximized metric, negated). Callers pick among
    the result by their second criterion, e.g. the least forgetting among the models whose target loss is close
    enough to the best.
    """
    items = list(items)
    if not items:
        return []
    scores = [score(item) for item in items]
    best = min(scores) if reference is None else reference
    limit = best + tolerance * abs(best)
    return [item for item, s in zip(items, scores) if s <= limit]
