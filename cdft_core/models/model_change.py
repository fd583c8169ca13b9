"""A strategy's model-changing step (``Strategy.change_model``): run it, record it, repeat it.

Most strategies only label parameters. One that adds to the model (LoRA) changes it once,
before labelling; the model's spec records the strategy's registered name and options so
that every rebuild from a checkpoint (``cdft eval``, ``predict``, ``embed``, ``explain``,
``export``) repeats the same change before loading the tensors, and ``cdft export`` can
fold it back into plain layers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from cdft_core.errors import UsageError
from cdft_core.strategy import Strategy, build_strategy

if TYPE_CHECKING:
    from cdft_core.models.model import CdftModel


def change_model(model: CdftModel, strategy: Strategy, name: str, options: Mapping[str, Any] | None,
                 log: Callable[[str], Any] | None = None, *, registry: Any = None) -> None:
    """Run the strategy's model-changing step (if any) and record it in ``model.spec``.

    ``name`` and ``options`` are what the registry built the strategy from. The spec keeps
    the name and *every* argument of the strategy's factory, defaults included
    (:func:`resolved_options`), so :func:`cdft_core.models.model.model_from_spec` rebuilds
    the same strategy and repeats the same change before a checkpoint's tensors are loaded,
    even after a later version changes a default (LoRA's alpha is in no tensor).
    """
    if strategy.change_model is None:
        return
    from cdft_core.text import jsonable

    described = strategy.change_model(model)
    model.spec["strategy"] = {"name": name, "options": jsonable(resolved_options(name, options, registry=registry))}
    if log is not None and isinstance(described, str):  # e.g. "LoRA in 8 layers (rank 8, alpha 16): ..."
        log(f"strategy {name} changed the model: {described}")


def resolved_options(name: str, options: Mapping[str, Any] | None, *, registry: Any = None) -> dict[str, Any]:
    """``options`` with the strategy factory's defaults filled in for every argument not given."""
    import inspect

    if registry is None:
        from cdft_core.registry import get_registry

        registry = get_registry()
    signature = inspect.signature(registry.get("strategy", name).factory)
    try:
        bound = signature.bind(**dict(options or {}))
    except (TypeError, ValueError):  # build_strategy refused these already; keep what was given
        return dict(options or {})
    bound.apply_defaults()
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {key: value for key, value in bound.arguments.items() if signature.parameters[key].kind not in variadic}


def replay_change(model: CdftModel, spec: Mapping[str, Any], *, registry: Any = None) -> None:
    """Repeat the model change a checkpoint's spec records (nothing when it records none)."""
    recorded = spec.get("strategy")
    if not recorded:
        return
    if registry is None:
        from cdft_core.registry import get_registry

        registry = get_registry()
    try:
        registry.get("strategy", recorded["name"])
    except UsageError:
        raise UsageError(f"the checkpoint was trained with strategy {recorded['name']!r}, which changed the model "
                         f"before training, and no installed plugin provides it; install the plugin that does "
                         f"(see `cdft plugins`)") from None
    strategy = build_strategy(recorded["name"], recorded.get("options") or {}, registry=registry)
    if strategy.change_model is None:
        raise UsageError(f"the checkpoint was trained with strategy {recorded['name']!r}, which changed the model, "
                         f"but the installed strategy of that name does not; install the plugin version that wrote it")
    strategy.change_model(model)
    model.spec["strategy"] = dict(recorded)


def merge_change(model: CdftModel, *, registry: Any = None) -> bool:
    """Fold a recorded model change back into plain layers (export); False when there is none to fold."""
    recorded = model.spec.get("strategy") if isinstance(getattr(model, "spec", None), Mapping) else None
    if not recorded:
        return False
    strategy = build_strategy(recorded["name"], recorded.get("options") or {}, registry=registry)
    if strategy.merge_model is None:
        return False
    strategy.merge_model(model)
    return True
