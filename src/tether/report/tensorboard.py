"""The final measurements of a run as TensorBoard scalars, next to the Trainer's own logs.

With `training.report_to: [tensorboard]` the Trainer's TensorBoardCallback writes the training logs (loss,
eval_loss and the `reg/<name>` terms, as train/reg/<name>). The target and forgetting metrics are measured after
`trainer.train()` returns, when that callback has already closed its writer in on_train_end; `trainer.log` would
reopen a writer nobody closes, add a row to history.jsonl and file the numbers under train/. So they are written
here with a writer of our own into the callback's directory (TensorBoard merges the event files of a directory),
as final/<key> at the last step, and the writer is closed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FINAL_KEYS = ("target", "overfit_gap", "forgetting")  # the numbers that judge a model; ema repeats them


def final_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """final/target/val_loss, final/forgetting/delta_loss, ... and the same for an alternative model: final/ema/..."""
    out: dict[str, float] = {}
    for key in FINAL_KEYS:
        _flatten(metrics.get(key), f"final/{key}", out)
    for name, sub in metrics.items():
        if isinstance(sub, dict) and "target" in sub:  # ema: a second final model, measured the same way
            for key in FINAL_KEYS:
                _flatten(sub.get(key), f"final/{name}/{key}", out)
    return out


def _flatten(value: Any, tag: str, out: dict[str, float]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{tag}/{k}", out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[tag] = float(value)


def write_final_scalars(trainer: Any, metrics: dict[str, Any]) -> Path | None:
    """Write final_scalars(metrics) where the run's TensorBoardCallback wrote; None when TensorBoard is not on."""
    from transformers.integrations import TensorBoardCallback

    logging_dirs = [cb.logging_dir for cb in trainer.callback_handler.callbacks if isinstance(cb, TensorBoardCallback)]
    if not logging_dirs or logging_dirs[0] is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=logging_dirs[0])
    try:
        for tag, value in final_scalars(metrics).items():
            writer.add_scalar(tag, value, trainer.state.global_step)
    finally:
        writer.close()
    return Path(logging_dirs[0])
