"""`tether report`: one self-contained report.html from the files finished runs wrote.

Each run directory holds metrics.json, history.jsonl and config.yaml (run.py `_finish`). The report shows, per run,
the loss curves with the restored best step, every `reg/<name>` penalty term over the steps, the forgetting of the
reference data, and the alternative final models (ema, wise_ft); for several runs first a comparison table and the
trade-off plot (forgetting against target loss, one point per run).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure

from tether.errors import TetherError
from tether.outputs import write_text_atomic
from tether.report.html import figure_tag, page, table_tag

FINISHED = "pass the output directory of a finished `tether train` run"


@dataclass(frozen=True)
class Run:
    """What one run directory holds, read and checked."""

    name: str
    path: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    config: dict[str, Any]


def load_run(path: Path, name: str | None = None) -> Run:
    """Read a run directory; a missing or unreadable file is a TetherError that says what to pass instead."""
    if not path.is_dir():
        raise TetherError(f"{path} is not a directory: {FINISHED}")
    metrics_path = path / "metrics.json"
    if not metrics_path.is_file():
        raise TetherError(f"{path} has no metrics.json (training did not finish there): {FINISHED}")
    metrics = _read(metrics_path, json.loads)
    history = _read(path / "history.jsonl", lambda text: [json.loads(line) for line in text.splitlines() if line])
    config = _read(path / "config.yaml", yaml.safe_load)
    if not isinstance(metrics, dict) or "target" not in metrics or not isinstance(config, dict):
        raise TetherError(f"{path}: metrics.json or config.yaml is not what `tether train` writes: {FINISHED}")
    return Run(name or path.name, path, metrics, history, config)


def _read(path: Path, parse: Any) -> Any:
    try:
        return parse(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TetherError(f"{path} is missing: {FINISHED}") from None
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise TetherError(f"{path} cannot be read ({type(e).__name__}): {FINISHED}") from None


def write_report(run_dirs: list[Path], out: Path) -> Path:
    """Write report.html for one run (its own sections) or several (comparison first); returns its path."""
    if not run_dirs:
        raise TetherError(f"no run directory given: {FINISHED}")
    runs = [load_run(Path(d), name) for d, name in zip(run_dirs, _names(run_dirs))]
    if len(runs) == 1:
        title, sections = f"tether report: {runs[0].name}", run_sections(runs[0])
    else:
        title = f"tether report: {len(runs)} runs"
        sections = comparison_sections(runs) + [(f"Run {r.name}", _nest(run_sections(r))) for r in runs]
    write_text_atomic(out, page(title, sections))
    return out


def _names(run_dirs: list[Path]) -> list[str]:
    """The directory names, or the paths as given where two runs share a name (runs/a/run and runs/b/run)."""
    names = [Path(d).resolve().name for d in run_dirs]
    return [n if names.count(n) == 1 else str(d) for n, d in zip(names, run_dirs)]


def _nest(sections: list[tuple[str, str]]) -> str:
    return "\n".join(f"<h3>{html.escape(h)}</h3>\n{body}" for h, body in sections)


def run_sections(run: Run) -> list[tuple[str, str]]:
    """The sections of one run: summary, loss curves, penalty terms, forgetting, alternative models, config."""
    sections = [
        ("Summary", summary_table([run])),
        ("Loss curves", loss_curves(run)),
        ("Regularizer terms", regularizer_terms(run)),
        ("Forgetting", forgetting_section(run)),
        ("Forgetting during training", tracked_section(run)),
    ]
    if "lm_eval" in run.metrics:
        sections.append(("lm-evaluation-harness", lm_eval_section(run.metrics["lm_eval"])))
    alternatives = alternative_models(run)
    if alternatives:
        sections.append(("Alternative final models", alternatives))
    text = yaml.safe_dump(run.config, sort_keys=False)
    config = f"<details><summary>config.yaml</summary><pre>{html.escape(text)}</pre></details>"
    sections.append(("Config", config))
    return sections


SUMMARY_COLUMNS = [
    "run", "regularizers", "base_val_loss", "val_loss", "train_loss", "overfit_gap", "accuracy", "f1",
    "reference_loss_after", "delta_loss", "recall_after", "trained_on_measured", "best_step", "global_step",
    "wall_time_s",
]  # fmt: skip


def summary_row(run: Run) -> dict[str, Any]:
    """One table row: the final model's target and forgetting numbers and the regularizers with strengths."""
    m = run.metrics
    regs = [
        f"{r['name']}={r['strength']:g}" if "strength" in r else r["name"] for r in run.config.get("regularizers", [])
    ]
    return {
        "run": run.name,
        "regularizers": ", ".join(regs) or "none",
        **m["target"],
        "overfit_gap": m.get("overfit_gap"),
        **m.get("forgetting", {}),
        "trained_on_measured": m.get("reference_roles", {}).get("trained_on_measured") or None,
        "best_step": m.get("best_step"),
        "global_step": m.get("global_step"),
        "wall_time_s": m.get("wall_time_s"),
    }


def summary_table(runs: list[Run]) -> str:
    rows = [summary_row(r) for r in runs]
    return table_tag(rows, _present(rows, SUMMARY_COLUMNS))


def comparison_sections(runs: list[Run]) -> list[tuple[str, str]]:
    """For several runs: every run's numbers side by side, and where each sits between learning and forgetting."""
    return [("Comparison", summary_table(runs)), ("Trade-off: forgetting against target loss", trade_off(runs))]


def trade_off(runs: list[Run]) -> str:
    points = [(r.name, r.metrics["forgetting"]["delta_loss"], r.metrics["target"]["val_loss"]) for r in runs
              if "forgetting" in r.metrics]  # fmt: skip
    if not points:
        return '<p class="note">No run measured forgetting (no data.reference): nothing to plot.</p>'
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    for name, x, y in points:
        ax.scatter([x], [y])
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.margins(0.2)  # room for the labels of the outermost points
    ax.ticklabel_format(useOffset=False)  # close runs would otherwise read as "+3.245" offsets
    ax.set_xlabel("forgetting: reference loss increase (delta_loss)")
    ax.set_ylabel("target validation loss")
    ax.set_title("lower left is better: learned more, forgot less")
    note = "" if len(points) == len(runs) else '<p class="note">Runs without reference data are left out.</p>'
    return figure_tag(fig, "target validation loss against forgetting, one point per run") + note


def loss_curves(run: Run) -> str:
    train = [(h["step"], h["loss"]) for h in run.history if "loss" in h and "step" in h]
    val = [(h["step"], h["eval_loss"]) for h in run.history if "eval_loss" in h and "step" in h]
    if not train and not val:
        return '<p class="note">history.jsonl holds no losses (logging_steps larger than the run?).</p>'
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation loss")
    best, last = run.metrics.get("best_step"), run.metrics.get("global_step")
    if best is not None:
        ax.axvline(best, color="green", linestyle="--", label=f"best step {best} (restored)")
    if run.metrics.get("stopped_early") and last is not None:
        ax.axvline(last, color="grey", linestyle=":", label=f"stopped early at step {last}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    return figure_tag(fig, f"train and validation loss of {run.name}")


def regularizer_terms(run: Run) -> str:
    names = sorted({k for h in run.history for k in h if k.startswith("reg/")})
    if not names:
        return '<p class="note">No penalty term was logged (no regularizer with a penalty in this run).</p>'
    fig = Figure(figsize=(7, 2.2 * len(names)))
    axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, names):
        ax.plot(*zip(*[(h["step"], h[name]) for h in run.history if name in h]), marker=".")
        ax.set_ylabel(name)
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle("unweighted penalty terms (the loss adds strength x term)")
    fig.tight_layout()
    return figure_tag(fig, f"regularizer terms of {run.name}: {', '.join(names)}")


def forgetting_section(run: Run) -> str:
    f = run.metrics.get("forgetting")
    if not f:
        return '<p class="note">Not measured: the run had no data.reference.</p>'
    rows = [{"measure": "reference loss", "before": f["reference_loss_before"], "after": f["reference_loss_after"],
             "change": f["delta_loss"]}]  # fmt: skip
    if "recall_before" in f:
        rows.append({"measure": "fact recall", "before": f["recall_before"], "after": f["recall_after"],
                     "change": f["recall_after"] - f["recall_before"]})  # fmt: skip
    fig = Figure(figsize=(3.2 * len(rows), 3.2))
    for ax, row in zip(fig.subplots(1, len(rows), squeeze=False)[0], rows):
        ax.bar(["before", "after"], [row["before"], row["after"]], color=["#7a8ca5", "#d0703c"])
        ax.set_title(row["measure"])
        if row["measure"] == "fact recall":
            ax.set_ylim(0, 1)  # a share of the facts: the full scale shows how much of it is left
    fig.tight_layout()
    alt = f"reference data before and after fine-tuning {run.name}"
    table = table_tag(rows, ["measure", "before", "after", "change"])
    return roles_note(run.metrics.get("reference_roles")) + table + figure_tag(fig, alt)


def roles_note(roles: dict[str, Any] | None) -> str:
    """Which reference rows were measured and what the regularizers read; a warning when they trained on the
    measured rows (the forgetting then flatters them)."""
    if not roles:
        return ""
    read = "; ".join(f"{name} read {what}" for name, what in roles.get("readers", {}).items())
    held = f", {rows(roles, 'held_out')} held out for the regularizers" if roles.get("held_out_rows") else ""
    note = f'<p class="note">Measured on {rows(roles, "measured")} of data.reference{held}. {html.escape(read)}</p>'
    if roles.get("trained_on_measured"):
        shared = roles.get("measured_examples_read")
        note += (
            '<p class="warning"><strong>Warning:</strong> this run trained on the measured reference rows (replay or '
            f"ewc read {'them' if shared is None else f'{shared} of the measured examples'}): the forgetting below "
            "flatters it. Give the regularizers their own data (replay.source, ewc.data), leave "
            "evaluation.train_on_measured off, or remove rows that data.reference holds twice.</p>"
        )
    return note


def rows(roles: dict[str, Any], which: str) -> str:
    """'30 rows', or '30 rows (65 examples)' when long rows were windowed (runs before the count of examples: rows)."""
    count, examples = roles[f"{which}_rows"], roles.get(f"{which}_examples", roles[f"{which}_rows"])
    return f"{count} rows" if examples == count else f"{count} rows ({examples} examples)"


def tracked_section(run: Run) -> str:
    """The forgetting tracked at each evaluation (tether.tracking): a table and the forgetting panel."""
    keys = ["step", "eval_loss", "eval_reference_loss", "eval_forgetting", "eval_recall", "eval_probe_kl"]
    keys.append("eval_within_budget")
    rows = [{k: h.get(k) for k in keys} for h in run.history if "eval_loss" in h and any(k in h for k in keys[2:])]
    if not rows:
        return '<p class="note">Not tracked (evaluation.track off, no evaluation, or a run from an older tether).</p>'
    from tether.outputs import plot_forgetting

    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    plot_forgetting(ax, run.history, run.metrics.get("best_step"))
    ax.set_xlabel("optimizer step")
    fig.tight_layout()
    budget = (run.config.get("early_stopping") or {}).get("forgetting_budget")
    note = ""
    if budget is not None:
        measure = run.config["early_stopping"].get("forgetting_measure", "delta_loss")
        note = f'<p class="note">Best checkpoint: the best target metric among evaluations with {measure} &le; '
        note += f"{budget:g} (hollow points are over it).</p>"
    return note + table_tag(rows, _present(rows, keys)) + figure_tag(fig, f"forgetting during training of {run.name}")


def lm_eval_section(scores: dict[str, Any]) -> str:
    rows = [{"task": task, "metric": metric, **values} for task, metrics in scores.items()
            for metric, values in metrics.items()]  # fmt: skip
    return table_tag(rows, ["task", "metric", "before", "after", "delta"])


def alternative_models(run: Run) -> str:
    """The ema model and the wise_ft interpolations next to the final model (empty when neither ran)."""
    m = run.metrics
    parts = []
    if "ema" in m:
        rows = [_model_row("final (model/)", m), _model_row(f"ema decay {m['ema']['decay']:g} (model_ema/)", m["ema"])]
        parts.append("<h4>EMA of the weights</h4>" + table_tag(rows, _present(rows, MODEL_COLUMNS)))
    if "wise_ft" in m:
        parts.append(wise_ft_part(m["wise_ft"]))
    if "merge" in m:
        parts.append(merge_part(m["merge"]))
    return "\n".join(parts)


MODEL_COLUMNS = ["model", "val_loss", "train_loss", "overfit_gap", "accuracy", "delta_loss", "recall_after"]


def _model_row(label: str, metrics: dict[str, Any]) -> dict[str, Any]:
    return {"model": label, **metrics["target"], "overfit_gap": metrics.get("overfit_gap"),
            **metrics.get("forgetting", {})}  # fmt: skip


def _present(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    return [c for c in columns if any(r.get(c) is not None for r in rows)]


def wise_ft_part(w: dict[str, Any]) -> str:
    rows = [{**r, "chosen": "yes (model_wise_ft/)" if r["alpha"] == w["chosen_alpha"] else ""} for r in w["alphas"]]
    table = table_tag(rows, _present(rows, ["alpha", "val_loss", "reference_loss", "delta_loss", "recall", "chosen"]))
    head = f"<h4>WiSE-FT interpolations (choice: {html.escape(str(w['choose']))})</h4>"
    if "delta_loss" not in rows[0]:
        return head + table
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot([r["delta_loss"] for r in rows], [r["val_loss"] for r in rows], marker="o")
    for r in rows:
        label = f"alpha {r['alpha']:g}" + (" (chosen)" if r["chosen"] else "")
        ax.annotate(label, (r["delta_loss"], r["val_loss"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("forgetting: reference loss increase (delta_loss)")
    ax.set_ylabel("target validation loss")
    return head + table + figure_tag(fig, "WiSE-FT: target loss against forgetting per alpha")


def merge_part(merge: dict[str, Any]) -> str:
    """merge's candidates: their table and the front, one series per method, the chosen one starred."""
    rows = [
        {**r, "chosen": "yes (model_merge/)" if r["candidate"] == merge["chosen"] else ""} for r in merge["candidates"]
    ]
    columns = ["candidate", "val_loss", "reference_loss", "delta_loss", "recall", "chosen"]
    head = f"<h4>merge candidates (choice: {html.escape(str(merge['choose']))})</h4>"
    table = table_tag(rows, _present(rows, columns))
    if "delta_loss" not in rows[0]:
        return head + table
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for method in dict.fromkeys(r["method"] for r in rows):
        own = [r for r in rows if r["method"] == method]
        ax.scatter([r["delta_loss"] for r in own], [r["val_loss"] for r in own], label=method, alpha=0.7)
    chosen = next(r for r in rows if r["chosen"])
    ax.scatter([chosen["delta_loss"]], [chosen["val_loss"]], marker="*", s=200, color="crimson", label="chosen")
    ax.set_xlabel("forgetting: reference loss increase (delta_loss)")
    ax.set_ylabel("target validation loss")
    ax.legend(fontsize=8)
    return head + table + figure_tag(fig, "merge: target loss against forgetting per candidate")
