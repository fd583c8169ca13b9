"""The built-in fine-tuning strategies of the paper (docs/method.md#strategies): linear, full, frt, staged.

Registered through the same hook and ``register`` callable a third-party plugin uses
(see docs/strategies.md for one). Each factory returns a :class:`cdft_core.Strategy`;
``--strategy-option KEY=VALUE`` values arrive as keyword arguments (strings from the CLI).
"""

from __future__ import annotations

from typing import Any

from cdft_core import (
    TRAINABLE,
    Stage,
    Strategy,
    UsageError,
    hookimpl,
    parse_option,
    parse_stage_epochs,
    strategy_metadata,
    train_all,
    train_only,
)

#: The settings of the single trainable label of the built-ins: the run's learning rate.
_PLAIN = {TRAINABLE: {"lr_scale": 1.0}}


def linear() -> Strategy:
    """Linear probing: only the head trains; the backbone stays frozen (no adapter)."""
    return Strategy("linear", (Stage("linear", train_only("head"), _PLAIN),), default_adapter="none")


def full() -> Strategy:
    """Full fine-tuning: every parameter trains (no adapter by default)."""
    return Strategy("full", (Stage("full", train_all(), _PLAIN),), default_adapter="none")


def frt() -> Strategy:
    """Frozen backbone, trained adapter and head: the CDTM setting of the paper."""
    return Strategy("frt", (_frt_stage(),), default_adapter="cdtm", requires_adapter=True)


def staged(stage_epochs: Any = None, lr_factor: Any = 0.1) -> Strategy:
    """Stage 1 as ``frt``; stage 2 trains everything from stage 1's best-validation weights.

    ``lr_factor`` scales stage 2's learning rate (paper: 0.1, i.e. ÷ 10). ``stage_epochs``
    is one count for both stages or ``E1,E2``; by default each stage runs the run's epoch
    count, as the paper did (warm-up restarts with each stage).
    """
    first, second = parse_stage_epochs(stage_epochs)
    factor = parse_option("lr_factor", lr_factor, float)
    if not factor > 0:
        raise UsageError(f"strategy option lr_factor={lr_factor!r} must be > 0")
    return Strategy(
        "staged",
        (
            _frt_stage(epochs=first),
            Stage("full", train_all(), _PLAIN, epochs=second, lr_factor=factor, init="best"),
        ),
        default_adapter="cdtm",
        requires_adapter=True,
    )


def _frt_stage(epochs: int | None = None) -> Stage:
    return Stage("frt", train_only("adapter", "head"), _PLAIN, epochs=epochs)


@hookimpl
def register_strategies(register):
    register(
        "linear",
        linear,
        description="Linear probe: train the head only, backbone frozen (default adapter none).",
        metadata=strategy_metadata(linear(), trains="head"),
    )
    register(
        "full",
        full,
        description="Full fine-tuning: train every parameter (default adapter none).",
        metadata=strategy_metadata(full(), trains="everything"),
    )
    register(
        "frt",
        frt,
        description="Frozen backbone; train the adapter and the head (default adapter cdtm).",
        metadata=strategy_metadata(frt(), trains="adapter, head"),
    )
    register(
        "staged",
        staged,
        description="Two stages in one run: frt, then everything from its best weights at lr x 0.1.",
        metadata=strategy_metadata(
            staged(),
            trains="adapter, head; then everything",
            options=["stage_epochs=E or E1,E2 (default: the run's epochs each)", "lr_factor=0.1"],
        ),
    )
