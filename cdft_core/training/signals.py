"""Preemption: SIGTERM sets a flag that the training loop checks between steps."""

from __future__ import annotations

import signal
from typing import Any


class StopRequest:
    """Set by SIGTERM (a scheduler preempting the job); the loop saves its state and stops."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: Any = None

    def install(self) -> None:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. embedded): no preemption handling
            self._previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    @property
    def requested(self) -> bool:
        return self.signal is not None
