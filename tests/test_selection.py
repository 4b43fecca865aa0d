"""within_tolerance: the band above the best (or a given reference), its boundary, ties and negative scores."""

from __future__ import annotations

from tether.selection import within_tolerance


def loss(row: dict[str, float]) -> float:
    return row["loss"]


def test_keeps_the_items_within_the_relative_band_above_the_best_in_order():
    rows = [{"loss": 1.2}, {"loss": 1.0}, {"loss": 1.05}, {"loss": 1.06}]
    assert within_tolerance(rows, loss, 0.05) == [{"loss": 1.0}, {"loss": 1.05}]  # 1.05 is on the boundary: kept


def test_ties_at_the_best_are_all_kept_even_with_zero_tolerance():
    rows = [{"loss": 2.0, "id": 0}, {"loss": 1.0, "id": 1}, {"loss": 1.0, "id": 2}]
    assert [r["id"] for r in within_tolerance(rows, loss, 0.0)] == [1, 2]


def test_negative_scores_keep_the_band_above_the_best():
    # -2 + 0.5 * |-2| = -1: a plain (1 + tolerance) * best would give -3 and keep nothing.
    assert within_tolerance([-2.0, -1.0, -0.5, -1.5], float, 0.5) == [-2.0, -1.0, -1.5]


def test_a_reference_replaces_the_best_and_may_keep_nothing():
    assert within_tolerance([1.04, 1.2, 0.9], float, 0.05, reference=1.0) == [1.04, 0.9]
    assert within_tolerance([1.2, 1.3], float, 0.05, reference=1.0) == []


def test_no_items_gives_an_empty_list():
    assert within_tolerance([], float, 0.05) == []
