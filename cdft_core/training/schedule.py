"""Seeds and learning rates: pure functions of the run's seed and of the step.

The learning-rate contract, one definition (docs/method.md#learning-rates): a parameter
group's rate at a step is ``schedule factor × stage.lr_factor × its label's lr_scale × lr``.
:func:`cdft_core.strategy.param_groups` fixes the last three as each group's ``base_lr``;
:func:`set_rates` applies the first.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Any

import numpy as np
import torch


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (e.g. seed, purpose, epoch, index)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def lr_factor(step: int, warmup_steps: int, total_steps: int, start_factor: float) -> float:
    """The paper's schedule: linear warm-up from ``start_factor`` to 1, then cosine from step 0.

    ``0.5·(1 + cos(π·step/total))`` counts steps from the stage's first step
    (docs/method.md#recipe), so the cosine is already below 1 when the warm-up ends.
    """
    if step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


def set_rates(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Every group's rate for this step: the schedule ``factor`` × the group's ``base_lr``."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def rates(optimizer: torch.optim.Optimizer, *, peak: bool = False) -> dict[str, float]:
    """The current rate of each label group (``{"trainable": 1e-4}``; a layer-wise decay shows several);
    ``peak``: the rates the schedule scales (``base_lr``), what a stage announces, resumed mid-warm-up or not."""
    key = "base_lr" if peak else "lr"
    return {str(group.get("label", index)): float(group.get(key, group["lr"]))
            for index, group in enumerate(optimizer.param_groups)}


def format_rates(values: dict[str, float]) -> str:
    """``lr 1e-04`` for one group, ``lr head 1e-04, last1 7.5e-05`` for several."""
    if len(values) == 1:
        return f"lr {next(iter(values.values())):.3g}"
    return "lr " + ", ".join(f"{label} {value:.3g}" for label, value in values.items())
