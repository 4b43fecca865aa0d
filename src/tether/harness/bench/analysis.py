"""From finished runs to verdicts: each run's measured points, their mean and spread over seeds, a method's best
strength, and the five pass/fail checks of the package docstring."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from tether.harness.bench.tasks import (
    BUDGET,
    MERGE_TOLERANCE,
    METHOD_BY_NAME,
    METHODS,
    SMALL_DATA_REGULARIZERS,
    Job,
    Task,
)
from tether.selection import within_tolerance

TARGET_COST = 0.05  # check 1 and the arithmetic best-strength rule: at most 5% more target loss than plain
FORGET_CUT = 0.5  # checks 1-3: at least half the forgetting removed
GAIN_KEPT = 0.9  # check 3: at least 90% of the target gain kept
KEEPERS = ("l2_sp", "ewc", "distill", "replay")  # check 1
FIELDS = ("val_loss", "delta_loss", "recall_drop", "overfit_gap", "wall_s", "base_val_loss")
# forgetting_budget: the target alone's choice; whether some evaluation was within the budget, and the restored one
FIELDS += ("target_only_val_loss", "target_only_delta_loss", "budget_within", "budget_kept")
# merge: the forgetting recovered (1 - F / F(fine-tuned)) by WiSE-FT's and by merge's best candidate in the band
FIELDS += ("wise_recovered", "merge_recovered")


def points_of(job: Job, metrics: dict[str, Any], wall_s: float) -> list[dict[str, Any]]:
    """The measured points of one finished run: one, or one per alpha > 0 for wise_ft."""
    common = {"task": job.task, "method": job.method, "knob": METHOD_BY_NAME[job.method].knob, "seed": job.seed}
    common.update(wall_s=wall_s, run_dir=str(job.run_dir), global_step=metrics.get("global_step"))
    if job.method == "wise_ft":
        rows = {r["alpha"]: r for r in metrics["wise_ft"]["alphas"]}
        before = metrics["forgetting"].get("recall_before")
        common.update(overfit_gap=None, base_val_loss=rows[0.0]["val_loss"])  # alpha 0 is the base model
        return [
            common | {
                "value": alpha, "val_loss": row["val_loss"], "delta_loss": row["delta_loss"],
                "recall_drop": None if before is None else before - row["recall"],
            }
            for alpha, row in rows.items() if alpha > 0
        ]  # fmt: skip
    if job.method == "merge":
        return [common | merge_point(metrics)]
    measured = metrics[job.method] if job.method in ("ema", "intruder") else metrics  # their second final model
    forgetting = measured["forgetting"]
    if "forgetting_budget" in metrics:  # the same run's evaluation with the lowest validation loss, as tracked
        budget = metrics["forgetting_budget"]
        alone, kept = budget["target_only"], forgetting["delta_loss"] <= budget["limit"]
        common.update(target_only_val_loss=alone["eval_loss"], target_only_delta_loss=alone["forgetting"])
        common.update(budget_within=float(budget["within"] > 0), budget_kept=float(kept))
    return [
        common | {
            "value": job.value, "val_loss": measured["target"]["val_loss"], "delta_loss": forgetting["delta_loss"],
            "recall_drop": forgetting.get("recall_drop"), "overfit_gap": measured["overfit_gap"],
        }
    ]  # fmt: skip


def merge_point(metrics: dict[str, Any]) -> dict[str, Any]:
    """merge's chosen model, and how much of the forgetting WiSE-FT's best and merge's best candidate recover among
    the candidates within MERGE_TOLERANCE of the best target loss (global alpha candidates are WiSE-FT's)."""
    rows = metrics["merge"]["candidates"]
    band = within_tolerance(rows, lambda r: r["val_loss"], MERGE_TOLERANCE)
    tuned = next(r for r in rows if r["candidate"] == "global 1")

    def recovered(pool: list[dict[str, Any]]) -> float | None:
        inside = [r for r in pool if r in band]
        if not inside or tuned["delta_loss"] <= 0:
            return None
        return 1 - min(r["delta_loss"] for r in inside) / tuned["delta_loss"]

    chosen = min(band, key=lambda r: r["delta_loss"])
    return {
        "value": None, "val_loss": chosen["val_loss"], "delta_loss": chosen["delta_loss"], "recall_drop": None,
        "overfit_gap": None, "wise_recovered": recovered([r for r in rows if r["method"] == "global"]),
        "merge_recovered": recovered(rows),
    }  # fmt: skip


def stats(values: list[float]) -> dict[str, float] | None:
    """Mean and sample standard deviation (0 for one value); None for no values."""
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def aggregate(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, method, value), in the order first seen: each field's stats over the seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault((p["task"], p["method"], p["value"]), []).append(p)
    rows = []
    for group in groups.values():
        row = {k: group[0][k] for k in ("task", "method", "knob", "value")}
        row["seeds"] = sorted(p["seed"] for p in group)
        row.update({f: stats([p[f] for p in group if p.get(f) is not None]) for f in FIELDS})
        rows.append(row)
    return rows


def mean(row: dict[str, Any], field: str) -> float:
    return row[field]["mean"]


def select(rows: list[dict[str, Any]], task: str, method: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["task"] == task and r["method"] == method]


def best_strength(rows: list[dict[str, Any]], plain: dict[str, Any], by: str) -> dict[str, Any]:
    """The best of one method's rows: least forgetting within TARGET_COST of plain's target loss ("tradeoff"; none
    within: lowest target loss), or lowest target loss ("target")."""
    lowest_target = min(rows, key=lambda r: mean(r, "val_loss"))
    if by == "target":
        return lowest_target
    within = within_tolerance(rows, lambda r: mean(r, "val_loss"), TARGET_COST, reference=mean(plain, "val_loss"))
    return min(within, key=lambda r: mean(r, "delta_loss")) if within else lowest_target


def best_per_method(rows: list[dict[str, Any]], task: Task) -> list[dict[str, Any]]:
    plain = select(rows, task.name, "plain")[0]
    found = [select(rows, task.name, m.name) for m in METHODS]
    return [best_strength(r, plain, task.best_by) for r in found if r]


@dataclass(frozen=True)
class Check:
    claim: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.claim}: {self.detail}"


def forgetting_cut(row: dict[str, Any], reference: dict[str, Any]) -> float:
    """1 - F/F_reference: the share of the reference's forgetting (facts' loss increase) that `row` avoids."""
    return 1 - mean(row, "delta_loss") / mean(reference, "delta_loss")


def target_cost(row: dict[str, Any], plain: dict[str, Any]) -> float:
    return mean(row, "val_loss") / mean(plain, "val_loss") - 1


def check_keepers(rows: list[dict[str, Any]]) -> Check:
    claim = "best of L2-SP / EWC / KD / replay: >= 50% less forgetting at <= 5% target-loss cost"
    plain = select(rows, "arithmetic", "plain")
    candidates = [r for m in KEEPERS for r in select(rows, "arithmetic", m)]
    if not plain or not candidates or mean(plain[0], "delta_loss") <= 0:
        return Check(claim, False, _unmeasurable(plain, candidates))
    scored = [(forgetting_cut(r, plain[0]), target_cost(r, plain[0]), r) for r in candidates]
    passing = [s for s in scored if s[0] >= FORGET_CUT and s[1] <= TARGET_COST]
    affordable = [s for s in scored if s[1] <= TARGET_COST]
    cut, cost, best = max(passing or affordable or scored, key=lambda s: s[0])
    return Check(claim, bool(passing), f"{_name(best)} {_cut_text(cut, best, plain[0])}, target loss {cost:+.1%}")


def check_replay(rows: list[dict[str, Any]]) -> Check:
    claim = "replay at 5% cuts forgetting by >= 50%"
    plain = select(rows, "arithmetic", "plain")
    replay = [r for r in select(rows, "arithmetic", "replay") if r["value"] == 0.05]
    if not plain or not replay or mean(plain[0], "delta_loss") <= 0:
        return Check(claim, False, _unmeasurable(plain, replay))
    cut = forgetting_cut(replay[0], plain[0])
    detail = f"{_cut_text(cut, replay[0], plain[0])}, target loss {target_cost(replay[0], plain[0]):+.1%}"
    return Check(claim, cut >= FORGET_CUT, detail)


def check_wise_ft(rows: list[dict[str, Any]]) -> Check:
    claim = "a WiSE-FT alpha recovers >= 50% of the forgetting and keeps >= 90% of the target gain"
    by_alpha = {r["value"]: r for r in select(rows, "arithmetic", "wise_ft")}
    full = by_alpha.pop(1.0, None)
    if full is None or not by_alpha or mean(full, "delta_loss") <= 0:
        return Check(claim, False, "not measurable: no wise_ft run at alpha 1 that forgot, or no alpha below 1")
    base = mean(full, "base_val_loss")
    gain = base - mean(full, "val_loss")
    if gain <= 0:
        return Check(claim, False, f"not measurable: fine-tuning did not lower the target loss (base {base:.3f})")
    scored = [(forgetting_cut(r, full), (base - mean(r, "val_loss")) / gain, r) for r in by_alpha.values()]
    passing = [s for s in scored if s[0] >= FORGET_CUT and s[1] >= GAIN_KEPT]
    # Without a passing alpha, show the one closest to both thresholds.
    recovered, kept, best = max(passing, key=lambda s: s[0]) if passing else max(
        scored, key=lambda s: min(s[0] / FORGET_CUT, s[1] / GAIN_KEPT)
    )  # fmt: skip
    detail = (
        f"alpha {best['value']:g} recovers {recovered:.0%} of the forgetting (facts' loss "
        f"+{mean(best, 'delta_loss'):.3f} vs +{mean(full, 'delta_loss'):.3f} at alpha 1) and keeps {kept:.0%} of the "
        f"target gain (val loss {mean(best, 'val_loss'):.3f}; base {base:.3f}, alpha 1 {mean(full, 'val_loss'):.3f})"
    )
    return Check(claim, bool(passing), detail)


def check_small_data(rows: list[dict[str, Any]]) -> Check:
    claim = "small data: early stopping and one of weight decay / dropout / label smoothing beat plain run to the end"
    plain = select(rows, "small-data", "plain")
    stopping = select(rows, "small-data", "early_stopping")
    others = [r for m in SMALL_DATA_REGULARIZERS for r in select(rows, "small-data", m)]
    if not plain or not stopping or not others:
        return Check(claim, False, "not measured (a method of this check has no finished run)")
    target = mean(plain[0], "val_loss")
    best_stop = best_strength(stopping, plain[0], "target")
    best_other = best_strength(others, plain[0], "target")
    passed = mean(best_stop, "val_loss") < target and mean(best_other, "val_loss") < target
    detail = f"val loss {mean_sd(best_stop, 'val_loss')} ({_name(best_stop)}), {mean_sd(best_other, 'val_loss')} "
    detail += f"({_name(best_other)}) vs {mean_sd(plain[0], 'val_loss')} (plain)"
    return Check(claim, passed, detail)


def check_budget(rows: list[dict[str, Any]]) -> Check:
    claim = (
        f"retention-aware checkpoint choice (forgetting budget {BUDGET:g}): the restored checkpoint is within the "
        "budget wherever an evaluation was, and forgets >= 50% less than the target-only choice"
    )
    found = [r for r in select(rows, "arithmetic", "forgetting_budget") if r["value"] == BUDGET]
    if not found or found[0]["target_only_delta_loss"] is None:
        return Check(claim, False, "not measured (no finished forgetting_budget run at this budget)")
    row = found[0]
    seeds = len(row["seeds"])
    within, kept = round(mean(row, "budget_within") * seeds), round(mean(row, "budget_kept") * seeds)
    chosen, alone = mean(row, "delta_loss"), mean(row, "target_only_delta_loss")
    cut = 1 - chosen / alone if alone > 0 else 0.0
    detail = (
        f"restored within the budget on {kept} of {seeds} seeds ({within} had an evaluation within it; the others "
        f"restore the least forgetting); facts' loss +{chosen:.3f} vs +{alone:.3f} at the lowest validation loss of "
        f"the same runs ({cut:.0%} less forgetting); val loss {mean_sd(row, 'val_loss')} vs "
        f"{mean_sd(row, 'target_only_val_loss')}"
    )
    return Check(claim, within > 0 and kept == within and cut >= FORGET_CUT, detail)


def check_merge(rows: list[dict[str, Any]]) -> Check:
    claim = (
        f"the best merge candidate recovers more of the forgetting than global WiSE-FT within {MERGE_TOLERANCE:.0%} "
        "of the best target loss"
    )
    found = select(rows, "arithmetic", "merge")
    if not found or found[0]["wise_recovered"] is None or found[0]["merge_recovered"] is None:
        return Check(claim, False, "not measured (no finished merge run with candidates in the band)")
    merged, wise = mean(found[0], "merge_recovered"), mean(found[0], "wise_recovered")
    seeds = len(found[0]["seeds"])
    detail = f"{merged:.0%} vs {wise:.0%} (mean over {seeds} seeds; merge picks among more candidates)"
    return Check(claim, merged > wise, detail)


def checks(rows: list[dict[str, Any]]) -> list[Check]:
    return [
        check_keepers(rows), check_replay(rows), check_wise_ft(rows), check_small_data(rows), check_budget(rows),
        check_merge(rows),
    ]  # fmt: skip


def _unmeasurable(plain: list[dict[str, Any]], others: list[dict[str, Any]]) -> str:
    if not plain or not others:
        return "not measured (a method of this check has no finished run)"
    return f"not measurable: plain fine-tuning did not forget (facts' loss {mean(plain[0], 'delta_loss'):+.3f})"


def _cut_text(cut: float, row: dict[str, Any], reference: dict[str, Any]) -> str:
    return (
        f"cuts forgetting by {cut:.0%} (facts' loss +{mean(row, 'delta_loss'):.3f} vs "
        f"+{mean(reference, 'delta_loss'):.3f} plain)"
    )


def _name(row: dict[str, Any]) -> str:
    return row["method"] if row["value"] is None else f"{row['method']} {row['knob']} {row['value']:g}"


def mean_sd(row: dict[str, Any], field: str, fmt: str = ".3f", scale: float = 1.0, sign: str = "") -> str:
    """A field's "mean ± sd" over the seeds for the checks' details and the tables; "-" when not measured."""
    s = row[field]
    if s is None:
        return "-"
    text = f"{s['mean'] * scale:{sign}{fmt}}"
    if float(text) == 0:  # "-0" or "+0.000": a mean that rounds to zero has no sign
        text = text.lstrip("+-")
    return f"{text} ± {s['std'] * scale:{fmt}}"
