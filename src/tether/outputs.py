"""Files a run writes, each atomically (temporary name in the same directory, then rename)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tether.errors import TetherError

log = logging.getLogger(__name__)
RUN_STATE = ".tether"  # the run's own bookkeeping in its output directory: the lock, the config it started with


def file_mode(directory: bool = False) -> int:
    """The mode open() and mkdir() would give under the process's umask: mkstemp / mkdtemp (and the safetensors
    writer under save_pretrained) make owner-only files, and a run's outputs are shared like any other file."""
    mask = os.umask(0o022)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def share(directory: Path) -> None:
    """Give every file and folder under `directory` (itself included) the umask's mode."""
    for path in [directory, *directory.rglob("*")]:
        path.chmod(file_mode(path.is_dir()))


def write_text_atomic(path: Path, text: str) -> None:
    """Write text so that a reader (or a resume after a kill) sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def save_safetensors_atomic(tensors: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors (no pickle) written under a temporary name and renamed; tensors are moved to CPU, contiguous."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        _sort_header(Path(tmp))
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sort_header(path: Path) -> None:
    """safetensors writes the metadata in hash-map order, which changes from call to call: rewrite the header in
    place with sorted keys (the same length: only the order changes), so that identical runs write identical bytes."""
    with path.open("r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = f.read(size)
        ordered = json.dumps(json.loads(header), separators=(",", ":"), sort_keys=True).encode()
        if len(ordered) <= size:  # safetensors pads the header with spaces
            f.seek(8)
            f.write(ordered.ljust(size, b" "))


def write_dir_atomic(path: Path, fill: Callable[[Path], None]) -> None:
    """Fill a temporary sibling directory, then swap it in place of `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        fill(tmp)
        share(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def hold_run_dir(output_dir: Path) -> Iterator[None]:
    """Lock OUTPUT_DIR/.tether/lock for one run: a second run into the directory is refused, naming the holder. The
    kernel drops the lock when its process dies, so a killed run's lock is taken over (with a warning). A directory
    this call created and the run left with nothing but the lock in it is removed again."""
    path = output_dir / RUN_STATE / "lock"
    try:
        created = not output_dir.exists()  # exists() raises for a name too long
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # 0o666 & ~umask, as any other output
    except OSError as e:
        reason = e.strerror
        raise TetherError(f"output dir {output_dir} is not writable ({reason}): choose another --output-dir") from None
    _take_lock(fd, output_dir)
    try:
        yield
    finally:
        os.ftruncate(fd, 0)  # an empty lock file: released, not left by a killed run
        os.close(fd)
        if created and output_dir.is_dir() and {p.name for p in output_dir.iterdir()} <= {RUN_STATE}:
            shutil.rmtree(output_dir, ignore_errors=True)


def _take_lock(fd: int, output_dir: Path) -> None:
    holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise TetherError(
            f"{output_dir} is in use by another run ({holder or 'holder unknown'}): wait for it to end or choose "
            "another --output-dir"
        ) from None
    if holder:
        log.warning("%s: taking over the lock of a run that ended without releasing it (%s)", output_dir, holder)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)


def plot_curves(history: list[dict[str, Any]], best_step: int | None, path: Path) -> None:
    """curves.png: train and validation loss vs step, the restored best step marked; below, when forgetting was
    tracked during training (tether.tracking), the forgetting panel (plot_forgetting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tracked = any(k in h for h in history for k in TRACKED)
    fig, axes = plt.subplots(2 if tracked else 1, 1, figsize=(6, 6.5 if tracked else 4), sharex=True, squeeze=False)
    ax = axes[0, 0]
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    val = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation loss")
    if best_step is not None:
        ax.axvline(best_step, color="grey", linestyle="--", label=f"best step {best_step}")
    ax.set_ylabel("loss")
    ax.legend()
    if tracked:
        plot_forgetting(axes[1, 0], history, best_step)
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    save_png(fig, path)


TRACKED = {"eval_forgetting": "reference loss increase", "eval_probe_kl": "KL(original || model), probe"}


def plot_forgetting(ax: Any, history: list[dict[str, Any]], best_step: int | None) -> None:
    """The forgetting tracked at each evaluation: the reference loss increase and the probe KL (left axis), fact
    recall (right axis, 0-1), evaluations over the forgetting budget hollow."""
    for key, label in TRACKED.items():
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            line = ax.plot(*zip(*points), marker="o", label=label)[0]
            over = [(h["step"], h[key]) for h in history if key in h and h.get("eval_within_budget") == 0.0]
            if over:
                ax.scatter(*zip(*over), s=80, facecolors="white", edgecolors=line.get_color(), zorder=3)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_ylabel("forgetting")
    recall = [(h["step"], h["eval_recall"]) for h in history if "eval_recall" in h]
    if recall:
        right = ax.twinx()
        right.plot(*zip(*recall), marker="s", color="tab:green", label="fact recall")
        right.set_ylim(0, 1.05)
        right.set_ylabel("fact recall")
        right.legend(loc="center right")
    if best_step is not None:
        ax.axvline(best_step, color="grey", linestyle="--")
    ax.legend(loc="upper left", title="hollow: over the budget" if any("eval_within_budget" in h for h in history)
              else None)  # fmt: skip


def save_png(fig: Any, path: Path) -> None:
    """A matplotlib figure as a PNG written under a temporary name and renamed; the figure is closed."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
