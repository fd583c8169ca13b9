"""What a run tells its user: log lines (kept for ``train.log``) and the progress bars.

On a terminal, rank 0 shows tqdm bars (training: stage i/n, epoch j/m, images/s;
evaluation: batches) and log lines as ``cdft: message``. Anywhere else (a file, a pipe,
a batch system's log) there are no bars, and every line carries the time it was written,
as in ``train.log``: ``cdft: 12:03:04 message``.
"""

from __future__ import annotations

import sys
import time
from typing import Any


class RunLog:
    """Log lines of rank 0: on stderr, and kept for ``train.log`` in the run directory."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.previous = ""  # train.log of the run being resumed
        self.lines: list[str] = []

    def text(self) -> str:
        return self.previous + "".join(line + "\n" for line in self.lines)

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"{time.strftime('%H:%M:%S')} {message}"
        self.lines.append(line)
        print(f"cdft: {message if _is_terminal() else line}", file=sys.stderr, flush=True)


def _is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def stage_epoch(stage: int, stages: int, epoch: int, epochs: int) -> str:
    """Where a run stands, 1-based: ``stage 1/2 epoch 3/5``."""
    return f"stage {stage}/{stages} epoch {epoch}/{epochs}"


def progress_bar(enabled: bool, steps: int, start: int, description: str, unit: str = "step") -> Any:
    """tqdm on rank 0 when stderr is a terminal; None means periodic log lines (or nothing) instead."""
    if not (enabled and _is_terminal()):
        return None
    from tqdm import tqdm

    return tqdm(total=steps, initial=start, desc=description, unit=unit, leave=False, dynamic_ncols=True)

