"""The model card: README.md of a saved model (full weights, a LoRA adapter, an OSF run merged), saying what it was
fine-tuned from, with which regularizers at which strengths, and what was measured (target losses, overfitting gap,
forgetting).

The YAML header holds the fields the Hugging Face Hub reads (base_model, library_name, tags); for a LoRA adapter
base_model is the model to load it onto, which the adapter's own config may not name (a synthetic or local base).
"""

from __future__ import annotations

from typing import Any

from tether.regularizers import RegularizerConfig

SHOWN = {"name", "strength"}  # the table's own columns; every other non-default field goes under settings


def model_card(
    base_model: str,
    regularizers: list[RegularizerConfig],
    metrics: dict[str, Any],
    *,
    lora: bool = False,
    osf: bool = False,
    name: str = "model",
) -> str:
    """README.md text for a model fine-tuned from `base_model` with `regularizers`, given tether's metrics (those of
    metrics.json: target.*, overfit_gap, forgetting.*; any of them may be missing). `osf`: trained through PEFT's OSF
    and saved merged, a plain model."""
    library = "peft" if lora else "transformers"
    tags = ["tether", "fine-tuned", *(["osf"] if osf else []), *(c.name for c in regularizers)]
    what = "A LoRA adapter" if lora else "A model"
    lines = [
        "---",
        f"base_model: {base_model}",
        f"library_name: {library}",
        "tags:",
        *(f"- {tag}" for tag in tags),
        "---",
        "",
        f"# {name}",
        "",
        f"{what} fine-tuned from `{base_model}` with tether, regularized against overfitting and forgetting.",
    ]
    if lora:
        lines += ["", f"Load it onto its base: `PeftModel.from_pretrained(<{base_model}>, <this directory>)`."]
    if osf:
        lines += [
            "",
            "Trained through PEFT's OSF (orthogonal subspace fine-tuning: each adapted weight's top singular "
            "directions frozen, the rest trained orthogonally to them) and saved with its change merged into the "
            "weights: load it as the base model is loaded, no PEFT needed.",
        ]
    lines += ["", "## Regularizers", "", *_regularizers(regularizers), "", "## Results", "", *_results(metrics)]
    return "\n".join(lines) + "\n"


def _regularizers(configs: list[RegularizerConfig]) -> list[str]:
    if not configs:
        return ["None: a plain fine-tune."]
    rows = ["| regularizer | strength | settings |", "| --- | --- | --- |"]
    for c in configs:
        settings = c.model_dump(exclude_defaults=True, exclude=SHOWN)
        shown = ", ".join(f"{k}={v}" for k, v in settings.items()) or "defaults"
        rows.append(f"| {c.name} | {c.strength:g} | {shown} |")
    return rows


def _results(metrics: dict[str, Any]) -> list[str]:
    target, forgot = metrics.get("target", {}), metrics.get("forgetting", {})
    rows = ["| metric | value |", "| --- | --- |"]
    numbers = {key: value for key, value in target.items() if isinstance(value, int | float)}
    rows += [f"| target {key.replace('_', ' ')} | {value:.4f} |" for key, value in numbers.items()]
    if "overfit_gap" in metrics:
        rows.append(f"| overfitting gap (val - train loss) | {metrics['overfit_gap']:.4f} |")
    if forgot:
        before, after = forgot["reference_loss_before"], forgot["reference_loss_after"]
        rows.append(f"| reference loss before -> after | {before:.4f} -> {after:.4f} ({forgot['delta_loss']:+.4f}) |")
    if "recall_before" in forgot:
        rows.append(
            f"| reference recall before -> after | {forgot['recall_before']:.1%} -> {forgot['recall_after']:.1%} |"
        )
    if "global_step" in metrics:
        rows.append(f"| optimizer steps | {metrics['global_step']} |")
    if len(rows) == 2:
        return ["Not measured."]
    return rows


def run_card(cfg: Any, metrics: dict[str, Any]) -> str:
    """The card of a `tether train` run's model/ (cfg: its RunConfig)."""
    from tether.regularizers import parse_entries

    synthetic = cfg.model.synthetic
    base = (
        cfg.model.path
        if synthetic is None
        else f"synthetic {synthetic.arch} (tether.synthetic, seed {synthetic.seed})"
    )
    regularizers = parse_entries(cfg.regularizers)
    return model_card(base, regularizers, metrics, lora=cfg.lora is not None, osf=cfg.osf is not None)
