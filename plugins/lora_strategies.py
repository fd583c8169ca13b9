"""LoRA strategies: low-rank adapters inside the backbone, through peft (docs/strategies.md#lora).

``lora`` trains the LoRA tensors plus the adapter and head; ``staged-lora`` first trains
the adapter and head with the backbone frozen (``frt``), then LoRA from that stage's best
weights. Both change the model before labelling (``Strategy.change_model``): the LoRA
layers are injected once, when the model is built, and the stages only label them —
frozen in ``frt``, label ``lora`` when they train, so their learning rate can differ
(``lr_scale``). A third-party strategy that adds parameters (prompt tokens, adapters in
every block...) is written the same way; this module uses only the public API.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from cdft_core import (
    FROZEN,
    TRAINABLE,
    Stage,
    Strategy,
    UsageError,
    hookimpl,
    parse_option,
    parse_stage_epochs,
    strategy_metadata,
)

LORA = "lora"
_OPTIONS = ["rank=8", "alpha=16", "dropout=0.1", "target_modules=auto (or names, e.g. qkv,fc1)",
            "lr_scale=1.0 (LoRA's learning rate relative to the run's)"]


def _label(lora_trains: bool, params: Mapping[str, Any]) -> dict[str, str]:
    """LoRA tensors: ``lora`` (or frozen); adapter and head: trainable; the rest of the backbone: frozen."""
    from cdft_core import is_lora_parameter

    labels = {}
    for name in params:
        if is_lora_parameter(name):
            labels[name] = LORA if lora_trains else FROZEN
        elif name.startswith(("adapter.", "head.")):
            labels[name] = TRAINABLE
        else:
            labels[name] = FROZEN
    return labels


def _inject(options: Mapping[str, Any], model: Any) -> str:
    from cdft_core import inject_lora

    return inject_lora(model, **options)


def _merge(model: Any) -> None:
    from cdft_core import merge_lora

    merge_lora(model)


def _lora_options(rank: Any, alpha: Any, dropout: Any, target_modules: Any) -> dict[str, Any]:
    dropout_value = parse_option("dropout", dropout, float, minimum=0.0)
    if dropout_value >= 1:
        raise UsageError(f"strategy option dropout={dropout!r} must be below 1")
    alpha_value = parse_option("alpha", alpha, float)
    if not alpha_value > 0:
        raise UsageError(f"strategy option alpha={alpha!r} must be > 0")
    if not isinstance(target_modules, (str, list, tuple)):
        raise UsageError(f"strategy option target_modules={target_modules!r}: give auto or layer names like qkv,fc1")
    return {"rank": parse_option("rank", rank, int, minimum=1), "alpha": alpha_value, "dropout": dropout_value,
            "target_modules": target_modules}


def _scale(name: str, value: Any) -> float:
    scale = parse_option(name, value, float)
    if not scale > 0:
        raise UsageError(f"strategy option {name}={value!r} must be > 0")
    return scale


def lora(rank: Any = 8, alpha: Any = 16, dropout: Any = 0.1, target_modules: Any = "auto",
         lr_scale: Any = 1.0) -> Strategy:
    """LoRA in the backbone (peft), plus the adapter and head, from the start."""
    options = _lora_options(rank, alpha, dropout, target_modules)
    settings = {TRAINABLE: {"lr_scale": 1.0}, LORA: {"lr_scale": _scale("lr_scale", lr_scale)}}
    return Strategy("lora", (Stage("lora", partial(_label, True), settings),), default_adapter="cdtm",
                    change_model=partial(_inject, options), merge_model=_merge)


def staged_lora(rank: Any = 8, alpha: Any = 16, dropout: Any = 0.1, target_modules: Any = "auto",
                lr_scale: Any = 1.0, stage_epochs: Any = None, lr_factor: Any = 1.0) -> Strategy:
    """``frt`` (LoRA in place, frozen, still the identity), then LoRA + adapter + head from its best weights."""
    options = _lora_options(rank, alpha, dropout, target_modules)
    first, second = parse_stage_epochs(stage_epochs)
    settings = {TRAINABLE: {"lr_scale": 1.0}, LORA: {"lr_scale": _scale("lr_scale", lr_scale)}}
    return Strategy(
        "staged-lora",
        (
            Stage("frt", partial(_label, False), {TRAINABLE: {"lr_scale": 1.0}}, epochs=first),
            Stage("lora", partial(_label, True), settings, epochs=second, lr_factor=_scale("lr_factor", lr_factor),
                  init="best"),
        ),
        default_adapter="cdtm",
        requires_adapter=True,
        change_model=partial(_inject, options),
        merge_model=_merge,
    )


@hookimpl
def register_strategies(register):
    register(
        "lora",
        lora,
        description="LoRA (peft) in the backbone's linear/attention layers, plus the adapter and head.",
        metadata=strategy_metadata(lora(), trains="LoRA tensors, adapter, head", options=_OPTIONS),
    )
    register(
        "staged-lora",
        staged_lora,
        description="Two stages: frt, then LoRA + adapter + head from its best weights.",
        metadata=strategy_metadata(
            staged_lora(), trains="adapter, head; then LoRA tensors, adapter, head",
            options=[*_OPTIONS, "stage_epochs=E or E1,E2", "lr_factor=1.0 (stage 2)"],
        ),
    )
