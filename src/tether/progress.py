"""Rich progress bars for training runs (a Trainer callback) and for long loops such as pre-training."""

from __future__ import annotations

import time
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
    """Shows optimizer steps and the last losses of a Trainer run on a rich bar (only on the main process). When the
    console is not a terminal (output redirected to a file, a CI log) a bar would print nothing: then one plain line
    is printed at every log of the Trainer (every training.logging_steps steps, and at each evaluation)."""

    def __init__(self, description: str, console: Console | None = None) -> None:
        self.description = description
        self.console = console
        self.bar: Progress | None = None
        self.task: Any = None
        self.started: tuple[float, int] = (0.0, 0)
        """(time, step) when this session of training began (a resumed run starts past step 0)."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = (time.perf_counter(), state.global_step)
        if state.is_world_process_zero and not self.plain:
            self.bar = progress_bar(self.console)
            self.bar.start()
            self.task = self.bar.add_task(self.description, total=state.max_steps, info="")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=state.global_step)

    @property
    def plain(self) -> bool:
        return self.console is not None and not self.console.is_terminal

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.plain and any(k in SHOWN for k in logs or {}) and state.is_world_process_zero:
            line = plain_line(self.description, state, logs, *self.started)
            self.console.print(line, highlight=False, soft_wrap=True)
            self.console.file.flush()
        if self.bar is not None and logs:
            shown = {k: v for k, v in logs.items() if k in ("loss", "eval_loss")}
            if shown:
                info = " ".join(f"{k}={v:.3f}" for k, v in shown.items())
                self.bar.update(self.task, info=info)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


SHOWN = ("loss", "eval_loss", "eval_forgetting", "eval_recall", "eval_probe_kl", "learning_rate")


def plain_line(description: str, state: Any, logs: dict, started: float, first_step: int) -> str:
    """`training: step 120/400 (30%) loss 1.234 learning_rate 0.0005 | 1m02s elapsed, ~2m25s left`: the time left
    at the pace of the steps run since `started` (at step `first_step`)."""
    step, total, elapsed = state.global_step, state.max_steps, time.perf_counter() - started
    shown = " ".join(f"{k} {logs[k]:.4g}" for k in SHOWN if isinstance(logs.get(k), (int, float)))
    done = step - first_step
    eta = f", ~{_duration(elapsed / done * (total - step))} left" if done > 0 else ""
    return (
        f"{description}: step {step}/{total} ({step / max(total, 1):.0%}) {shown} | {_duration(elapsed)} elapsed{eta}"
    )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


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
