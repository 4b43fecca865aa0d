"""The sweep's report: sweep.html with its Pareto and importance plots, and the table printed at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna

from tether.outputs import save_png, write_json, write_text_atomic


def write_outputs(study: optuna.Study, summary: dict[str, Any], out: Path) -> None:
    """sweep.json, sweep_pareto.png, sweep_importance.png and sweep.html (the plots inlined, and the tables)."""
    from tether.report.html import page, png_tag, table_tag

    write_json(out / "sweep.json", summary)
    objectives = [o["metric"] for o in summary["objectives"]]
    chosen = summary["chosen"]
    front = [
        {"trial": c["trial"], "model": _label(c), **c["values"], "chosen": "chosen" if _same(c, chosen) else None}
        for c in summary["candidate_front"]
    ]
    save_png(pareto_figure(summary), out / "sweep_pareto.png")
    pareto = png_tag(out / "sweep_pareto.png", "Pareto plot")
    sections = [
        ("Summary", _summary_html(summary)),
        ("Pareto front", pareto + table_tag(front, ["trial", "model", *objectives, "chosen"])),
    ]
    if summary["importance"]:
        save_png(importance_figure(summary["importance"]), out / "sweep_importance.png")
        sections.append(("Parameter importance", png_tag(out / "sweep_importance.png", "parameter importance")))
    rows = [{**t, **t.get("values", {}), **t["params"]} for t in summary["trials"]]
    params = sorted({p for t in summary["trials"] for p in t["params"]})
    sections.append(("All trials", table_tag(rows, ["number", "state", *objectives, *params, "run_dir"])))
    write_text_atomic(out / "sweep.html", page(f"tether sweep: {summary['study']}", sections))


def _label(c: dict[str, Any]) -> str:
    return c["model"] + (f" (alpha {c['alpha']:g})" if "alpha" in c else "")


def _same(a: dict[str, Any], b: dict[str, Any] | None) -> bool:
    return b is not None and (a["trial"], a["model"]) == (b["trial"], b["model"])


def _summary_html(summary: dict[str, Any]) -> str:
    import html

    chosen = summary["chosen"]
    states = ", ".join(f"{n} {s.lower()}" for s, n in summary["states"].items())
    text = f"<p>Study <b>{html.escape(summary['study'])}</b> in {html.escape(summary['storage'])}: {states}.</p>"
    if chosen is None:
        return text + "<p>No completed trial meets the constraints: nothing chosen.</p>"
    rule = summary["choose"]
    values = ", ".join(f"{m} {v:.4g}" for m, v in chosen["values"].items())
    params = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in chosen["params"].items())
    return text + (
        f"<p>Chosen by {rule['rule']} (tolerance {rule['tolerance']:g}): trial {chosen['trial']}, "
        f"<code>{html.escape(chosen['model_dir'])}</code>: {html.escape(values)}; with {html.escape(params)}.</p>"
    )


def pareto_figure(summary: dict[str, Any]) -> Any:
    """Every candidate model of the completed trials on the first two objectives (one objective: against the trial
    number); the non-dominated ones joined, the chosen one starred, infeasible ones crossed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [o["metric"] for o in summary["objectives"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))

    def xy(c: dict[str, Any]) -> tuple[float, float]:
        values = c["values"]
        return (values[names[0]], values[names[1]]) if len(names) > 1 else (c["trial"], values[names[0]])

    styles = {"model": ("o", "tab:blue"), "model_ema": ("s", "tab:orange"), "model_wise_ft": ("^", "tab:green"),
              "model_merge": ("D", "tab:purple")}  # fmt: skip
    for model, (marker, color) in styles.items():
        for feasible in (True, False):
            pts = [xy(c) for c in summary["candidates"] if c["model"] == model and c["feasible"] == feasible]
            if pts:
                label = f"{model}/" + ("" if feasible else " (fails a constraint)")
                ax.scatter(*zip(*pts), marker=marker if feasible else "x", color=color, alpha=0.6, label=label)
    for c in summary["candidates"]:
        if c["model"] == "model":
            ax.annotate(str(c["trial"]), xy(c), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = sorted(xy(c) for c in summary["candidate_front"])
    if front:
        ax.plot(*zip(*front), color="black", linewidth=1, label="Pareto front")
    if summary["chosen"] is not None:
        ax.scatter(*xy(summary["chosen"]), marker="*", s=250, color="crimson", zorder=5, label="chosen")
    ax.set_xlabel(names[0] if len(names) > 1 else "trial")
    ax.set_ylabel(names[1] if len(names) > 1 else names[0])
    ax.set_title(f"study {summary['study']}: {summary['states'].get('COMPLETE', 0)} completed trials")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def importance_figure(importance: dict[str, dict[str, float]]) -> Any:
    """Horizontal bars: each parameter's importance for each objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = sorted({p for imp in importance.values() for p in imp})
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(params) * len(importance) + 1.2))
    height = 0.8 / len(importance)
    for i, (objective, imp) in enumerate(importance.items()):
        ys = [j + i * height for j in range(len(params))]
        ax.barh(ys, [imp.get(p, 0.0) for p in params], height=height, label=objective)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(params))], params)
    ax.set_xlabel("importance (PED-ANOVA, normalized per objective)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def summary_table(summary: dict[str, Any]) -> Any:
    """The non-dominated candidate models as a rich table, the chosen one marked."""
    from rich.table import Table

    objectives = [o["metric"] for o in summary["objectives"]]
    states = ", ".join(f"{n} {s.lower()}" for s, n in summary["states"].items())
    table = Table(title=f"study {summary['study']}: Pareto front of the candidate models ({states})")
    for col in ("trial", "model", *objectives, ""):
        table.add_column(col, justify="right" if col in objectives else "left")
    for c in summary["candidate_front"]:
        mark = "chosen" if _same(c, summary["chosen"]) else ""
        table.add_row(str(c["trial"]), _label(c), *(f"{c['values'][m]:.4g}" for m in objectives), mark)
    return table
