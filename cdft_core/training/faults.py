"""Test-only fault injection: one rank fails at a chosen step (never set it in real runs).

``CDFT_TEST_FAULT=rank=R,stage=S,epoch=E,step=N,action=A`` (1-based stage, epoch and step;
``rank`` optional) with ``A`` = ``raise`` (raise an error), ``stall`` (print
``cdft-test-fault: stalled`` on stderr and wait to be killed) or ``sigterm`` (send itself
SIGTERM, like a preempting scheduler). Tests use it to check that a failure ends the job
promptly and that a run killed mid-epoch resumes exactly. The engine sees only the
step hook :func:`step_hook_from_env` returns.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from cdft_core.errors import CdftError

FAULT_ENV = "CDFT_TEST_FAULT"

#: ``hook(stage, epoch, step)`` (1-based) called after every training step
StepHook = Callable[[int, int, int], None]


@dataclass(frozen=True)
class Fault:
    """A failure injected through ``CDFT_TEST_FAULT``."""

    stage: int
    epoch: int
    step: int
    action: str
    rank: int | None = None

    @classmethod
    def parse(cls, raw: str) -> Fault:
        fields_ = dict(part.split("=", 1) for part in raw.split(",") if "=" in part)
        return cls(
            stage=int(fields_.get("stage", 1)),
            epoch=int(fields_.get("epoch", 1)),
            step=int(fields_.get("step", 1)),
            action=fields_.get("action", "raise"),
            rank=int(fields_["rank"]) if "rank" in fields_ else None,
        )

    def check(self, rank: int, stage: int, epoch: int, step: int) -> None:
        if (self.rank is not None and rank != self.rank) or (stage, epoch, step) != (self.stage, self.epoch, self.step):
            return
        if self.action == "stall":
            print("cdft-test-fault: stalled", file=sys.stderr, flush=True)
            while True:
                time.sleep(1)
        if self.action == "sigterm":  # as a preempting scheduler would
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise CdftError(f"injected test fault on rank {rank} at stage {stage} epoch {epoch} step {step} ({FAULT_ENV})")


def step_hook_from_env(rank: int) -> StepHook | None:
    """The step hook of ``CDFT_TEST_FAULT`` for this rank, or None (every real run)."""
    raw = os.environ.get(FAULT_ENV)
    if not raw:
        return None
    fault = Fault.parse(raw)
    return lambda stage, epoch, step: fault.check(rank, stage, epoch, step)
