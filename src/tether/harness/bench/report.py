"""The benchmark's outputs: bench.json, bench.md, pareto.png and bench.html, and the tables printed at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tether.evaluate import pareto_indices
from tether.harness.bench.analysis import best_per_method, mean, mean_sd
from tether.harness.bench.tasks import METHODS, TASKS, Task
from tether.outputs import save_png, write_json, write_text_atomic

COLUMNS = ("method", "strength", "target loss", "facts' loss +", "recall drop %", "overfit gap", "s/run")


def table_cells(row: dict[str, Any]) -> list[str]:
    strength = "-" if row["value"] is None else f"{row['knob']} {row['value']:g}"
    return [
        row["method"], strength, mean_sd(row, "val_loss"), mean_sd(row, "delta_loss", sign="+"),
        mean_sd(row, "recall_drop", ".0f", 100), mean_sd(row, "overfit_gap"), f"{mean(row, 'wall_s'):.1f}",
    ]  # fmt: skip


def markdown_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    return lines + ["| " + " | ".join(table_cells(r)) + " |" for r in rows]


def markdown(result: dict[str, Any]) -> str:
    """bench.md: how it was run, the checks, the best strength per method and every strength, per task."""
    rows = result["aggregates"]
    out = ["# tether bench", "", f"`{result['command']}` on {result['machine']}: {result['summary']}", ""]
    out += ["## Checks", "", *(f"- {c['line']}" for c in result["checks"]), ""]
    for task in TASKS:
        rule = (
            "least forgetting within 5% of plain's target loss" if task.best_by == "tradeoff" else "lowest target loss"
        )
        out += [f"## {task.name}: {task.title}", "", f"Best strength per method ({rule}), mean ± sd over seeds:", ""]
        out += [*markdown_table(best_per_method(rows, task)), ""]
    for task in TASKS:
        out += [
            f"## {task.name}: every strength",
            "",
            *markdown_table([r for r in rows if r["task"] == task.name]),
            "",
        ]
    return "\n".join(out)


def rich_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("method", "strength") else "right")
    for row in rows:
        table.add_row(*table_cells(row))
    return table


def plot_pareto(rows: list[dict[str, Any]], path: Path) -> None:
    """pareto.png: per task, target val loss against forgetting, one series per method over its strengths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(15, 6))
    for ax, task in zip(axes, TASKS):
        _pareto_axes(ax, [r for r in rows if r["task"] == task.name], task)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    save_png(fig, path)


def _pareto_axes(ax: Any, rows: list[dict[str, Any]], task: Task) -> None:
    import matplotlib.pyplot as plt

    tab20 = plt.get_cmap("tab20").colors
    colors, markers = tab20[0::2] + tab20[1::2], "osD^v<>pPXh"  # ten distinct hues first, then their light tints
    for i, method in enumerate(METHODS):
        series = sorted((r for r in rows if r["method"] == method.name), key=lambda r: r["value"] or 0)
        xs, ys = [mean(r, "delta_loss") for r in series], [mean(r, "val_loss") for r in series]
        if method.name == "plain":
            ax.scatter(xs, ys, marker="*", s=300, color="black", zorder=5, label="plain (marked)")
        elif series:
            ax.plot(xs, ys, marker=markers[i % len(markers)], color=colors[i % len(colors)], lw=1, ms=5,
                    label=method.name)  # fmt: skip
    points = [(mean(r, "delta_loss"), mean(r, "val_loss")) for r in rows]
    front = sorted(points[i] for i in pareto_indices(points))  # by forgetting, for the step line
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", ls="--", color="grey", label="Pareto front")
    ax.set_xscale("symlog", linthresh=0.01)  # most keepers sit near 0, plain near 5
    ax.set_xlabel("forgetting: facts' loss increase (mean over seeds)")
    ax.set_ylabel("target validation loss (mean over seeds)")
    ax.set_title(f"{task.name}: {task.title}", fontsize=10)
    ax.grid(alpha=0.3)


def write_html(result: dict[str, Any], path: Path) -> None:
    """bench.html: the checks, the plot and the tables as one self-contained page (tether.report.html)."""
    import html

    from tether.report.html import page, png_tag

    png = png_tag(path.with_name("pareto.png"), "Pareto plot")
    checks_html = "<ul>" + "".join(f"<li>{html.escape(c['line'])}</li>" for c in result["checks"]) + "</ul>"
    sections = [("Checks", f"<p>{html.escape(result['command'])}: {html.escape(result['summary'])}</p>{checks_html}")]
    sections.append(("Trade-off", png))
    for task in TASKS:
        best = best_per_method(result["aggregates"], task)
        sections.append((f"{task.name}: {task.title}", _html_table(best)))
    write_text_atomic(path, page("tether bench", sections))


def _html_table(rows: list[dict[str, Any]]) -> str:
    from tether.report.html import table_tag

    return table_tag([dict(zip(COLUMNS, table_cells(r))) for r in rows], list(COLUMNS))


def write_outputs(result: dict[str, Any], output_dir: Path) -> None:
    write_json(output_dir / "bench.json", result)
    write_text_atomic(output_dir / "bench.md", markdown(result))
    plot_pareto(result["aggregates"], output_dir / "pareto.png")
    write_html(result, output_dir / "bench.html")


def show(result: dict[str, Any], console: Console) -> None:
    for task in TASKS:
        console.print(rich_table(best_per_method(result["aggregates"], task), f"{task.name}: {task.title}"))
    for check in result["checks"]:
        style = "green" if check["passed"] else "red"
        console.print(f"[{style}]{check['line']}[/]", highlight=False, soft_wrap=True)  # one line each: greppable
    console.print(f"{result['summary']}; wrote bench.json, bench.md, pareto.png, bench.html", highlight=False)
