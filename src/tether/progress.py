"""Rich progress bars for training runs (a Trainer callback) and for long loops such as pre-training."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback

from tether.distributed import is_main_process


def progress_bar(console: Console | None = None) -> Progress:
    """One bar style for every long step: description, bar, n/total, elapsed, remaining."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console, transient=True,
    )  # fmt: skip


class RichProgress(TrainerCallback):
    """Shows optimizer steps and the last losses of a Trainer run on a rich bar (only on the main process)."""

    def __init__(self, description: str, console: Console | None = None) -> None:
        self.description = description
        self.console = console
        self.bar: Progress | None = None
        self.task: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.bar = progress_bar(self.console)
            self.bar.start()
            self.task = self.bar.add_task(self.description, total=state.max_steps, info="")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.bar is not None and logs:
            shown = {k: v for k, v in logs.items() if k in ("loss", "eval_loss")}
            if shown:
                info = " ".join(f"{k}={v:.3f}" for k, v in shown.items())
                self.bar.update(self.task, info=info)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


@contextmanager
def pass_progress(console: Console | None) -> Iterator[Callable[[str, int | None], Callable[[int], None]] | None]:
    """progress(description, total) for passes before training (the Fisher): one transient bar each; None (silent)
    without a console or off the main process."""
    if console is None or not is_main_process():
        yield None
        return
    with progress_bar(console) as bar:

        def start(description: str, total: int | None) -> Callable[[int], None]:
            task = bar.add_task(description, total=total, info="")
            return lambda n: bar.advance(task, n)

        yield start
