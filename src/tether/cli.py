"""The command line: tether train | validate | eval | demo. User errors are one line on stderr and exit code 2."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tether.errors import TetherError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(width=None if sys.stdout.isatty() else 110)  # pipes and CI logs get a readable table
err_console = Console(stderr=True)
SetOpt = Annotated[list[str], typer.Option("--set", help="Override a config value: key.path=value (repeatable).")]


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(2)


@app.command()
def validate(config: Path, set_: SetOpt = []) -> None:  # noqa: B006
    """Check a config (sections, training arguments, regularizers, files) without training."""
    from tether.config import load_config

    cfg = load_config(config, set_)
    names = ", ".join(r.name for r in cfg.regularizers) or "none"
    console.print(f"[green]ok[/] {config}: task {cfg.task}, regularizers: {names}")


@app.command()
def train(
    config: Path,
    output_dir: Annotated[Path | None, typer.Option(help="Run directory (default: the config's output_dir).")] = None,
    set_: SetOpt = [],  # noqa: B006  (typer reads the default, never mutates it)
    resume: Annotated[
        bool, typer.Option(help="Continue from the last checkpoint (automatic when unfinished).")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Train into a directory that holds a finished run.")] = False,
) -> None:
    """Fine-tune as configured; writes model/, metrics.json, history.jsonl, curves.png and checkpoints."""
    from tether.config import load_config
    from tether.run import train as run_train

    cfg = load_config(config, set_)
    out = output_dir or Path(cfg.output_dir)
    from tether.progress import RichProgress

    progress = [RichProgress("training", console)]
    metrics = run_train(cfg, out, resume=resume, overwrite=overwrite, callbacks=progress, console=console)
    console.print_json(json.dumps(metrics))
    console.print(f"[green]done[/]: {out}")


@app.command("eval")
def eval_(
    config: Path,
    model: Annotated[Path, typer.Option(help="A saved model/ directory (full model or LoRA adapter).")],
    set_: SetOpt = [],  # noqa: B006  (typer reads the default, never mutates it)
) -> None:
    """Evaluate a saved model on the configured validation and reference data."""
    from tether.config import load_config
    from tether.run import evaluate_saved

    console.print_json(json.dumps(evaluate_saved(load_config(config, set_), model)))


@app.command()
def demo(
    output_dir: Annotated[Path, typer.Option(help="Where the demo's runs go.")] = Path("runs/demo"),
) -> None:
    """Offline demo: pre-train a tiny model on invented facts, fine-tune it on arithmetic plain and regularized."""
    from tether.demo import run_demo

    run_demo(output_dir, console)


def main() -> None:
    """Entry point: runs the app and turns user errors into one line and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file save bars; tether shows its own progress
    try:
        app(standalone_mode=False)
    except TetherError as e:
        _fail(str(e))
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:
        import click

        if isinstance(e, click.exceptions.UsageError):
            err_console.print(f"[bold red]error:[/] {e.format_message()}", highlight=False)
            sys.exit(2)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
