"""The errors tether reports to the user as one line (exit code 2), never as a traceback."""


class TetherError(Exception):
    """A problem with the user's input (config, data, paths, checkpoints); the message says what to change."""


class ConfigError(TetherError):
    """A config value is missing, of the wrong type, out of range or contradicts another."""


class DataError(TetherError):
    """A dataset file or row cannot be used; the message names the file and line."""


class NonFiniteError(TetherError):
    """The task loss or a penalty became NaN/inf; the message names the term."""

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step
        """The optimizer step it is about, when known where it is raised."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training; the message says the step reached and the last checkpoint."""

    def __init__(self, message: str, checkpoint: str | None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        """The last complete checkpoint (what `--resume` continues from), None when none was written."""


def one_line(e: BaseException) -> str:
    """A library's message on one line: its first line, or all of it when the first line ends with a colon (a list
    follows, and the line alone would end mid-sentence)."""
    lines = str(e).strip().splitlines()
    if not lines:
        return type(e).__name__
    return " ".join(" ".join(lines).split()) if lines[0].rstrip().endswith(":") else lines[0]
