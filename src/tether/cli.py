"""The command line: tether train | validate | eval | report | sweep | bench | demo. User errors: one line, exit 2."""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from tether.errors import Interrupted, TetherError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(width=None if sys.stdout.isatty() else 110)  # pipes and CI logs get a readable table
err_console = Console(stderr=True)
SetOpt = Annotated[list[str], typer.Option("--set", help="Override a config value: key.path=value (repeatable).")]


def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"tether {version('tether')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(2)


_SIGNAL = {"received": signal.SIGINT}  # the signal that stopped training; the exit status is 128 + its number


def _interrupt(signum: int, frame: object) -> None:
    _SIGNAL["received"] = signal.Signals(signum)
    raise KeyboardInterrupt


def _stopped(e: KeyboardInterrupt, out: Path, command: list[str]) -> NoReturn:
    """One line: where training stopped, the last checkpoint and the command that continues; exit 130 / 143."""
    from tether.run import last_complete_checkpoint

    last = e.checkpoint if isinstance(e, Interrupted) else out.is_dir() and last_complete_checkpoint(out)
    where = str(e) if isinstance(e, Interrupted) else f"last checkpoint: {last or 'none yet'}"
    again = shlex.join([*command, "--resume"] if last else command)
    err_console.print(f"interrupted: {where}; continue with: {again}", highlight=False, soft_wrap=True)
    sys.exit(128 + _SIGNAL["received"])


def disk_full(e: BaseException, out: Path) -> TetherError | None:
    """A full disk as one line: checkpoints and outputs are written atomically, so a rerun continues exactly."""
    text = str(e)
    if getattr(e, "errno", None) not in (errno.ENOSPC, errno.EDQUOT) and "No space left on device" not in text:
        return None
    where = getattr(e, "filename", None) or out
    return TetherError(f"no space left on device at {where}: free space and rerun; nothing lost")


@app.command()
def validate(config: Path, set_: SetOpt = []) -> None:  # noqa: B006
    """Check a config (sections, training arguments, regularizers, files, the data's rows) without training."""
    from tether.config import load_config
    from tether.data import check_data
    from tether.regularizers import RegularizerStack, parse_entries
    from tether.run import check_sharding, training_args

    cfg = load_config(config, set_)
    args = training_args(cfg, Path(cfg.output_dir))  # as train builds them before anything is written
    version = int(args.fsdp_config.get("version", 2)) if args.fsdp else None  # transformers' own default
    check_sharding(cfg, RegularizerStack.from_configs(parse_entries(cfg.regularizers)), version, bool(args.deepspeed))
    summary = check_data(cfg)  # the tokenizer, every row and label, as train reads them
    names = ", ".join(r.name for r in cfg.regularizers) or "none"
    console.print(f"[green]ok[/] {config}: task {cfg.task}, regularizers: {names}")
    for line in summary:
        console.print(f"data {line}", highlight=False, soft_wrap=True)


@app.command()
def train(
    config: Path,
    output_dir: Annotated[Path | None, typer.Option(help="Run directory (default: the config's output_dir).")] = None,
    set_: SetOpt = [],  # noqa: B006  (typer reads the default, never mutates it)
    resume: Annotated[
        bool, typer.Option(help="Continue from the last checkpoint (automatic when unfinished).")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Train into a directory that holds a finished run.")] = False,
    accept_changes: Annotated[
        bool, typer.Option(help="Resume with a config that differs from the one the run started with.")
    ] = False,
) -> None:
    """Fine-tune as configured; writes model/, metrics.json, history.jsonl, curves.png and checkpoints."""
    from tether.config import load_config
    from tether.distributed import shutdown
    from tether.run import train as run_train

    cfg = load_config(config, set_)
    out = output_dir or Path(cfg.output_dir)
    from tether.progress import RichProgress

    progress = [RichProgress("training", console)]
    signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's or `kill`'s stop: the same clean stop as Ctrl-C
    try:
        metrics = run_train(
            cfg, out, resume=resume, overwrite=overwrite, accept_changes=accept_changes, callbacks=progress,
            console=console,
        )  # fmt: skip
    except KeyboardInterrupt as e:
        _stopped(e, out, ["tether", "train", str(config), "--output-dir", str(out), *(f"--set={s}" for s in set_)])
    except Exception as e:
        full = disk_full(e, out)
        if full is None:
            raise
        raise full from None
    shutdown()
    if metrics:  # with several processes, only the main one measures and reports
        console.print_json(json.dumps(metrics))
        console.print(f"[green]done[/]: {out}")


@app.command("eval")
def eval_(
    config: Path,
    model: Annotated[Path, typer.Option(help="A saved model/ directory (full model or LoRA adapter).")],
    data: Annotated[
        Path | None, typer.Option(help="Score this file (the config's format) instead of the validation data.")
    ] = None,
    set_: SetOpt = [],  # noqa: B006  (typer reads the default, never mutates it)
) -> None:
    """Evaluate a saved model on the configured validation and reference data, or on any file (--data)."""
    from tether.config import load_config
    from tether.progress import pass_progress
    from tether.run import evaluate_saved

    cfg = load_config(config, set_)
    if data is not None and not data.exists():
        raise TetherError(f"--data {data} does not exist: pass a JSONL file or a save_to_disk directory")
    with pass_progress(console) as progress:
        metrics = evaluate_saved(cfg, model, progress, data)
    console.print_json(json.dumps(metrics))


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Directories of finished runs (tether train's output).")],
    output: Annotated[Path | None, typer.Option(help="Default RUN_DIR/report.html; several: ./report.html")] = None,
) -> None:
    """One self-contained report.html: loss curves, penalty terms, forgetting; several runs are compared."""
    from tether.report.runs import write_report

    out = output or (run_dirs[0] / "report.html" if len(run_dirs) == 1 else Path("report.html"))
    console.print(f"[green]wrote[/] {write_report(run_dirs, out)}")


@app.command()
def sweep(
    config: Path,
    trials: Annotated[int | None, typer.Option(help="Trials to finish (default: the config's sweep.trials).")] = None,
    storage: Annotated[str | None, typer.Option(help="Optuna RDB URL (default: sqlite:///OUT/sweep.db).")] = None,
    study: Annotated[str | None, typer.Option(help="Study name (default: the config file's name).")] = None,
    workers: Annotated[int, typer.Option(help="Trials run at once, in processes on this machine.")] = 1,
    output_dir: Annotated[Path | None, typer.Option(help="Where trial-<n>/ and the report go.")] = None,
    set_: SetOpt = [],  # noqa: B006  (typer reads the default, never mutates it)
) -> None:
    """Search the config's sweep: values with Optuna; resumable, parallel; writes sweep.json and sweep.html."""
    from tether.config import load_config
    from tether.harness.sweep import run_sweep, summary_table

    cfg = load_config(config, set_)
    out = output_dir or Path(cfg.output_dir)
    try:
        summary = run_sweep(cfg, out, study_name=study or config.stem, trials=trials, storage=storage, workers=workers)
    except KeyboardInterrupt:
        err_console.print("interrupted: running trials are queued again; run the same command to resume")
        sys.exit(130)
    console.print(summary_table(summary))
    console.print(f"[green]done[/]: {out}/sweep.json, {out}/sweep.html")


@app.command("inspect")
def inspect_(
    config: Path,
    json_: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    set_: SetOpt = [],  # noqa: B006  (typer reads the default, never mutates it)
) -> None:
    """Show what a run will do, without training: optimizer groups, llrd depths, dropout, new heads, anchors."""
    from tether.config import load_config
    from tether.inspect import inspect_run, render

    plan = inspect_run(load_config(config, set_))
    if json_:
        sys.stdout.write(json.dumps(plan, indent=2) + "\n")  # plain: a pipe or a test parses it
        return
    for line in render(plan):
        console.print(line, highlight=False, markup=False, soft_wrap=True)


@app.command()
def demo(
    output_dir: Annotated[Path, typer.Option(help="Where the demo's runs go.")] = Path("runs/demo"),
) -> None:
    """Offline demo: pre-train a tiny model on invented facts, fine-tune it on arithmetic plain and regularized."""
    from tether.harness.demo import run_demo

    run_demo(output_dir, console)


@app.command()
def bench(
    quick: Annotated[bool, typer.Option(help="A reduced grid (one or two strengths per method): minutes.")] = False,
    seeds: Annotated[int, typer.Option(help="Seeds per setting: world, pre-trained base and training seed.")] = 3,
    workers: Annotated[int | None, typer.Option(help="Runs at once, one torch thread each [default: cores].")] = None,
    output_dir: Annotated[Path, typer.Option(help="Runs and results; run again to resume.")] = Path("runs/bench"),
) -> None:
    """Every regularizer against plain fine-tuning on the demo's world: forgetting, overfitting, pass/fail checks."""
    from tether.harness.bench import run_bench

    run_bench(output_dir, quick=quick, seeds=seeds, workers=workers or os.cpu_count() or 1, console=console)


def main() -> None:
    """Entry point: runs the app and turns user errors into one line and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file save bars; tether shows its own progress
    try:
        code = app(standalone_mode=False)  # typer returns the status of an Exit (130 for Ctrl-C outside training)
    except TetherError as e:
        _fail(str(e))
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(130)
    except typer.TyperException as e:  # usage errors (a missing argument, an unknown option): one line, exit 2
        err_console.print(f"[bold red]error:[/] {e.format_message()}", highlight=False, soft_wrap=True)
        sys.exit(2)
    if isinstance(code, int) and code:  # success returns: a caller of main() in-process goes on
        sys.exit(code)


if __name__ == "__main__":
    main()
