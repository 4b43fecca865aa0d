"""`tether demo`: the whole promise in under three minutes, offline.

A tiny Llama is pre-trained on invented facts ("The capital of Vorland is Pessa."), then fine-tuned on a new task
(small-number arithmetic) twice: plain, and with regularizers. The table shows what each run learned (target
validation loss) and what it forgot (fact recall before/after, reference loss increase).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tether.config import validate_config
from tether.progress import RichProgress, progress_bar

# Each entry: run name -> regularizers. The regularized run pulls toward the pre-trained weights (decoupled L2-SP:
# lr * strength * steps = 1.5e-3 * 10 * 200 = 3, in the 2-6 range that keeps the facts) and replays 10% facts.
RUNS: dict[str, list[dict[str, Any]]] = {
    "plain": [],
    "regularized": [{"name": "l2_sp", "strength": 10.0}, {"name": "replay", "ratio": 0.1}],
}


def demo_config(base: Any, regularizers: list[dict[str, Any]]) -> dict[str, Any]:
    """The config of one demo run, as a user would write it in YAML."""
    from tether.synthetic import DEMO_FINETUNE

    training = {k: v for k, v in DEMO_FINETUNE.items() if k != "weight_decay"}
    training.update(eval_steps=max(1, training["max_steps"] // 5), logging_steps=10, save_total_limit=1)
    return {
        "model": {"path": str(base.model_dir)},
        "data": {
            "train": str(base.data["task_train"]),
            "validation": str(base.data["task_val"]),
            "reference": str(base.data["facts"]),
            "format": "prompt_completion",
            "max_length": 48,
        },
        "training": training,
        "regularizers": regularizers,
        # Half the facts are measured, the other half is what replay, ewc and si may read (tether.roles): every
        # run, with or without them, is judged on the same 200 facts, none of which it trained on.
        "evaluation": {"reference_holdout": 0.5},
    }


def run_demo(output_dir: Path, console: Console) -> dict[str, dict[str, Any]]:
    """Pre-train (or load the cached base), fine-tune plain and regularized, print the comparison table."""
    from tether.run import train
    from tether.synthetic import pretrained_base

    started = time.perf_counter()
    with progress_bar(console) as bar:
        task = bar.add_task("pre-training the base model (cached after the first run)", total=None, info="")
        base = pretrained_base(progress=lambda done, total: bar.update(task, completed=done, total=total))
    console.print(f"base model: {base.model_dir} (fact recall {base.recall:.0%})")
    results = {}
    for name, regularizers in RUNS.items():
        cfg = validate_config(demo_config(base, regularizers))
        progress = RichProgress(f"fine-tuning: {name}", console)
        results[name] = train(cfg, output_dir / name, overwrite=True, callbacks=[progress])
    console.print(results_table(results))
    console.print(f"runs: {output_dir}/<run>/ (metrics.json, curves.png, model/)")
    console.print(f"demo wall time: {time.perf_counter() - started:.0f} s")
    return results


def results_table(results: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="tether demo: learn arithmetic, keep the facts")
    for col in ("run", "regularizers", "target val loss", "recall before", "recall after", "ref loss +"):
        table.add_column(col, justify="left" if col in ("run", "regularizers") else "right")
    for name, m in results.items():
        f = m["forgetting"]
        regs = ", ".join(r["name"] for r in RUNS[name]) or "-"
        table.add_row(
            name, regs, f"{m['target']['val_loss']:.3f}", f"{f['recall_before']:.0%}", f"{f['recall_after']:.0%}",
            f"{f['delta_loss']:+.3f}",
        )  # fmt: skip
    return table
