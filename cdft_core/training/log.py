"""What a run tells its user: log lines (kept for ``train.log``) and the progress bar."""

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
        print(f"cdft: {message}", file=sys.stderr, flush=True)


def progress_bar(enabled: bool, steps: int, start: int, description: str) -> Any:
    """tqdm on rank 0 when stderr is a terminal; None means periodic log lines instead."""
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=steps, initial=start, desc=description, leave=False, dynamic_ncols=True)
