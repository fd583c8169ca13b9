"""Fine-tuning strategies: pure labellings of the parameter tree, run as a list of stages.

In the optax way, a strategy does not touch the training loop. It *labels* every
parameter (``"frozen"`` or a trainable label such as ``"trainable"``) with a pure function
of the parameter names, and says what each trainable label gets (a learning-rate scale).
Everything else follows from the labels:

- :func:`apply_stage` sets ``requires_grad`` from them — frozen parameters are excluded
  from autograd, not given zero updates — keeps every module whose parameters are all
  frozen in eval mode (its BatchNorm statistics do not move either), and marks the model
  ``backbone_frozen`` when no backbone parameter trains, so the model runs the backbone
  under ``torch.no_grad()`` and stores no activations for it;
- :func:`param_groups` builds the optimiser's parameter groups from the trainable labels
  only, so frozen parameters have no gradient and no optimiser state.

A strategy is an ordered tuple of :class:`Stage`\\ s. ``staged`` (docs/method.md#strategies) is two stages in
one run: the ``frt`` labelling, then everything trainable from the first stage's best
validation weights at a tenth of the learning rate. The engine runs the stages; for each
one it calls :func:`apply_stage` on the *unwrapped* model, then builds a fresh optimiser
(and, when distributed, wraps the model in DDP afresh) — ``requires_grad`` must never be
toggled on a live DDP model, which would hang or silently skip gradients.

Label functions see parameter *names* (the flat state-dict spelling of the model's tree,
see :mod:`cdft_core.functional.pytree`), so they work on any backbone whose module layout they know.
This module imports no torch: strategy plugins import it while ``cdft list`` runs.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from cdft_core.errors import UsageError
from cdft_core.functional.pytree import FROZEN, check_labels

if TYPE_CHECKING:
    import torch

    from cdft_core.models.model import CdftModel

#: The label of every trainable parameter in the built-in strategies.
TRAINABLE = "trainable"

#: The keys a label's settings may carry, relative to the run's values.
SETTING_KEYS = ("lr_scale", "weight_decay_scale")

#: ``label_fn(params) -> {name: label}``; ``params`` maps every parameter name to its tensor.
LabelFn = Callable[[Mapping[str, Any]], dict[str, str]]

#: The parts of a model that start from random weights in every run.
FRESH_PARTS = ("adapter", "head")


@dataclass(frozen=True)
class Stage:
    """One training phase: a labelling, its settings, and how long and from where it runs.

    ``label_settings`` maps each trainable label to ``{"lr_scale": s, "weight_decay_scale": w}``
    (both optional, default 1.0); the label ``"frozen"`` needs no entry. ``epochs=None``
    means the run's epoch count. ``lr_factor`` multiplies the run's learning rate for the
    whole stage (on top of each label's ``lr_scale``). ``init`` is ``"start"`` (continue
    from the weights as they are) or ``"best"`` (load the previous stage's best-validation
    weights first).
    """

    name: str
    label_fn: LabelFn
    label_settings: Mapping[str, Mapping[str, float]]
    epochs: int | None = None
    lr_factor: float = 1.0
    init: str = "start"

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise UsageError(f"a stage needs a non-empty name, got {self.name!r}")
        if not callable(self.label_fn):
            raise UsageError(f"stage {self.name!r}: label_fn is not callable")
        if self.init not in ("start", "best"):
            raise UsageError(f"stage {self.name!r}: init must be 'start' or 'best', got {self.init!r}")
        if self.epochs is not None and (not isinstance(self.epochs, int) or self.epochs < 1):
            raise UsageError(f"stage {self.name!r}: epochs must be a positive integer, got {self.epochs!r}")
        if not self.lr_factor > 0:
            raise UsageError(f"stage {self.name!r}: lr_factor must be > 0, got {self.lr_factor!r} (freeze with the 'frozen' label instead)")
        if FROZEN in self.label_settings:
            raise UsageError(f"stage {self.name!r}: the label 'frozen' takes no settings (frozen parameters never reach the optimiser)")
        for label, settings in self.label_settings.items():
            unknown = sorted(set(settings) - set(SETTING_KEYS))
            if unknown:
                raise UsageError(
                    f"stage {self.name!r}, label {label!r}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(SETTING_KEYS)}"
                )
            for key, value in settings.items():
                if not isinstance(value, (int, float)) or not value > 0:
                    raise UsageError(f"stage {self.name!r}, label {label!r}: {key} must be a number > 0, got {value!r}")
        object.__setattr__(self, "label_settings", {k: dict(v) for k, v in self.label_settings.items()})

    def labels(self, params: Mapping[str, Any]) -> dict[str, str]:
        """Label ``params`` (name -> tensor) and check the labelling: every name exactly
        once, every trainable label with settings (optax-style error listing both sets)."""
        labels = dict(self.label_fn(params))
        missing = [name for name in params if name not in labels]
        extra = [name for name in labels if name not in params]
        if missing or extra:
            raise UsageError(
                f"stage {self.name!r}: the labelling does not match the model: "
                f"{len(missing)} unlabelled parameters (e.g. {missing[:2]}), {len(extra)} labels for unknown names (e.g. {extra[:2]})"
            )
        check_labels(labels, self.label_settings, what=f"stage {self.name!r}")
        return {name: labels[name] for name in params}


#: ``change(model) -> None``: changes a freshly built model in place (e.g. adds LoRA layers).
ModelChange = Callable[["CdftModel"], Any]


@dataclass(frozen=True)
class Strategy:
    """A named, ordered tuple of stages plus the adapter used when none is asked for.

    ``requires_adapter``: the stages train the adapter, so an adapter without parameters
    (``none``) makes no sense with this strategy (e.g. ``frt``).

    ``change_model``: the one step that runs *before labelling*, for strategies that add
    to the model rather than only choose what trains (LoRA, visual prompt tuning...). It is
    called once on the freshly built model — before any stage labels it, before a resume
    state or a checkpoint's tensors are loaded, and again whenever a checkpoint is rebuilt
    from its spec (``cdft eval``, ``predict``, ``export``...), so it must be deterministic
    given torch's RNG and give its new parameters stable names. The stages then label the
    new parameters like any other. ``merge_model`` (optional) folds the change back into
    plain layers; ``cdft export`` calls it. See :mod:`cdft_core.models.model_change` and
    docs/strategies.md.
    """

    name: str
    stages: tuple[Stage, ...]
    default_adapter: str
    requires_adapter: bool = False
    change_model: ModelChange | None = None
    merge_model: ModelChange | None = None

    def __post_init__(self) -> None:
        stages = tuple(self.stages)
        object.__setattr__(self, "stages", stages)
        if not stages or not all(isinstance(s, Stage) for s in stages):
            raise UsageError(f"strategy {self.name!r} needs at least one Stage (got {self.stages!r})")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise UsageError(f"strategy {self.name!r}: stage names must differ, got {names}")
        if stages[0].init != "start":
            raise UsageError(f"strategy {self.name!r}: the first stage has no previous stage, so its init must be 'start'")


def strategy_metadata(strategy: Strategy, *, trains: str, options: Iterable[str] = (), **extra: Any) -> dict[str, Any]:
    """The registration metadata of a strategy, derived from the strategy its factory
    builds with default options: the default adapter and the stage names are stated once,
    on the :class:`Strategy`. ``trains`` and ``options`` describe it for ``cdft list``."""
    changes = {"changes_model": True} if strategy.change_model is not None else {}  # e.g. LoRA layers
    return {"default_adapter": strategy.default_adapter, "stages": [s.name for s in strategy.stages],
            "trains": trains, "options": list(options), **changes, **extra}


# -- label functions ---------------------------------------------------------------------
def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _label_by_prefix(prefixes: tuple[str, ...], label: str, params: Mapping[str, Any]) -> dict[str, str]:
    return {name: (label if _under(name, prefixes) else FROZEN) for name in params}


def train_only(*prefixes: str, label: str = TRAINABLE) -> LabelFn:
    """A label function: parameters under these module paths get ``label``, the rest are
    frozen. ``train_only("adapter", "head")`` is ``frt``; ``train_only("")`` trains nothing
    in particular — use :func:`train_all` for everything. Picklable (no closures)."""
    return partial(_label_by_prefix, tuple(prefixes), label)


def _label_all(label: str, params: Mapping[str, Any]) -> dict[str, str]:
    return dict.fromkeys(params, label)


def train_all(label: str = TRAINABLE) -> LabelFn:
    """A label function that gives every parameter ``label``."""
    return partial(_label_all, label)


# -- applying a strategy to a model -----------------------------------------------------
def labels_for(model: torch.nn.Module, stage: Stage) -> dict[str, str]:
    """The stage's labels for this model's parameters, checked; changes nothing."""
    return stage.labels(dict(model.named_parameters()))


def check_compatible(strategy: Strategy, model: CdftModel) -> None:
    """Refuse, before any work, a strategy that cannot train this model sensibly.

    Checks every stage's labelling (each parameter labelled, labels known, something
    trainable), that an adapter is there when the strategy trains one, and that the parts
    with fresh random weights (adapter, head) train in the first stage — a frozen random
    adapter would only scramble the features.
    """
    adapter_name = _adapter_name(model)
    adapter = getattr(model, "adapter", None)
    adapter_size = _count(adapter)
    if strategy.requires_adapter and adapter_size == 0:
        raise UsageError(
            f"strategy {strategy.name!r} trains the adapter, but adapter {adapter_name!r} has no parameters; "
            f"use --adapter {strategy.default_adapter} (or another adapter with parameters)"
        )
    for index, stage in enumerate(strategy.stages):
        labels = labels_for(model, stage)
        if all(label == FROZEN for label in labels.values()):
            raise UsageError(f"strategy {strategy.name!r}, stage {stage.name!r}: every parameter is frozen, nothing would train")
        if index > 0:
            continue
        for part in FRESH_PARTS:
            names = [n for n in labels if _under(n, (part,))]
            if names and all(labels[n] == FROZEN for n in names):
                what = f"adapter {adapter_name!r}" if part == "adapter" else "the head"
                fix = "choose a strategy that trains it (e.g. frt) or --adapter none" if part == "adapter" else "choose a strategy that trains the head"
                raise UsageError(
                    f"strategy {strategy.name!r} keeps {what} frozen at its random initialisation in stage {stage.name!r}; {fix}"
                )


def check_adapter(strategy: Strategy, adapter: str, *, registry: Any = None) -> None:
    """The same adapter check as :func:`check_compatible`, from the registry alone.

    Lets the CLI refuse ``--strategy frt --adapter none`` before building a model: an
    adapter registered with ``metadata={"has_parameters": False}`` cannot serve a strategy
    that trains the adapter. Adapters that do not say are checked once the model is built.
    """
    if not strategy.requires_adapter:
        return
    if registry is None:
        from cdft_core.registry import get_registry

        registry = get_registry()
    metadata = registry.get("adapter", adapter).metadata
    if metadata.get("has_parameters", True) is False:
        raise UsageError(
            f"strategy {strategy.name!r} trains the adapter, but adapter {adapter!r} has no parameters; "
            f"use --adapter {strategy.default_adapter} (or another adapter with parameters)"
        )


def apply_stage(model: CdftModel, stage: Stage) -> dict[str, str]:
    """Set ``requires_grad`` from the stage's labels and ``model.backbone_frozen``.

    Call it on the plain (unwrapped) model before building the stage's optimiser and
    before any DDP wrapping. Frozen parameters also lose any stale ``.grad``. Returns the
    labels (``{name: label}``) for :func:`param_groups`.
    """
    labels = labels_for(model, stage)
    for name, param in model.named_parameters():
        trainable = labels[name] != FROZEN
        param.requires_grad_(trainable)
        if not trainable:
            param.grad = None
    backbone = [labels[n] for n in labels if _under(n, ("backbone",))]
    model.backbone_frozen = all(label == FROZEN for label in backbone)
    model.frozen_modules = frozen_modules(model, labels)
    return labels


def frozen_modules(model: torch.nn.Module, labels: Mapping[str, str]) -> tuple[str, ...]:
    """The outermost modules whose parameters are all labelled frozen (modules without
    parameters of their own or below, such as activations, are left as they are)."""
    names: list[str] = []
    for name, module in model.named_modules():
        if not name or any(_under(name, (outer,)) for outer in names):
            continue
        params = [f"{name}.{p}" for p, _ in module.named_parameters()]
        if params and all(labels[p] == FROZEN for p in params):
            names.append(name)
    return tuple(names)


def param_groups(
    model: CdftModel, labels: Mapping[str, str], stage: Stage, lr: float, weight_decay: float
) -> list[dict]:
    """Optimiser parameter groups, one per trainable label, in model order.

    Each group carries ``params``, ``param_names``, ``label``, ``lr`` = ``lr`` ×
    ``stage.lr_factor`` × the label's ``lr_scale``, ``lr_scale`` (that rate relative to the
    run's ``lr``) and ``weight_decay`` (× ``weight_decay_scale``). The training loop
    multiplies each group's rate by the schedule factor at every step: the whole
    learning-rate contract is docs/method.md#learning-rates. Frozen parameters appear in no
    group, so the optimiser keeps no state for them.
    """
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if name not in labels:
            raise UsageError(f"param_groups: parameter {name!r} has no label; pass the labels apply_stage returned")
        label = labels[name]
        if label == FROZEN:
            continue
        if not param.requires_grad:
            raise UsageError(f"param_groups: {name!r} is labelled {label!r} but does not require grad; call apply_stage first")
        if label not in groups:
            if label not in stage.label_settings:
                check_labels(labels, stage.label_settings, what=f"stage {stage.name!r}")  # raises, listing both sets
            settings = stage.label_settings[label]
            scale = stage.lr_factor * float(settings.get("lr_scale", 1.0))
            groups[label] = {
                "params": [],
                "param_names": [],
                "label": label,
                "lr": lr * scale,
                "lr_scale": scale,
                "weight_decay": weight_decay * float(settings.get("weight_decay_scale", 1.0)),
            }
        groups[label]["params"].append(param)
        groups[label]["param_names"].append(name)
    return list(groups.values())


def label_summary(model: torch.nn.Module, labels: Mapping[str, str]) -> dict[str, dict[str, dict[str, int]]]:
    """Per top-level module and label: how many leaves and scalars, e.g.
    ``{"backbone": {"frozen": {"leaves": 78, "numel": 300096}}, "head": {"trainable": ...}}``.
    For logs and for checking a strategy by eye."""
    summary: dict[str, dict[str, dict[str, int]]] = {}
    for name, param in model.named_parameters():
        part = name.split(".", 1)[0]
        cell = summary.setdefault(part, {}).setdefault(labels[name], {"leaves": 0, "numel": 0})
        cell["leaves"] += 1
        cell["numel"] += param.numel()
    return summary


# -- building strategies from names and options -------------------------------------------
def build_strategy(name: str, options: Mapping[str, Any] | None = None, *, registry: Any = None) -> Strategy:
    """Resolve a strategy by name and call its factory with ``--strategy-option`` values.

    An option the factory does not take is a usage error naming the ones it does.
    """
    if registry is None:
        from cdft_core.registry import get_registry

        registry = get_registry()
    component = registry.get("strategy", name)
    options = dict(options or {})
    try:
        inspect.signature(component.factory).bind(**options)
    except TypeError:
        accepted = [
            p.name
            for p in inspect.signature(component.factory).parameters.values()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        raise UsageError(
            f"strategy {name!r} does not take option(s) {', '.join(sorted(options))}; "
            f"it takes: {', '.join(accepted) or 'no options'}"
        ) from None
    strategy = component.factory(**options)
    if not isinstance(strategy, Strategy):
        raise UsageError(f"strategy {name!r} (plugin {component.provider!r}) built a {type(strategy).__name__}, not a Strategy")
    return strategy


def parse_option(name: str, value: Any, kind: type = float, *, minimum: float | None = None) -> Any:
    """Turn a ``--strategy-option`` value (a string from the CLI, or a number) into ``kind``,
    with a one-line usage error when it does not parse or is below ``minimum``."""
    if kind is int and isinstance(value, float) and not value.is_integer():  # int(1.5) would run as 1
        raise UsageError(f"strategy option {name}={value!r} must be a whole number")
    try:
        parsed = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"strategy option {name}={value!r} is not a valid {kind.__name__}") from None
    if isinstance(parsed, float) and not math.isfinite(parsed):
        raise UsageError(f"strategy option {name}={value!r} must be a finite number")
    if minimum is not None and parsed < minimum:
        raise UsageError(f"strategy option {name}={value!r} must be at least {minimum}")
    return parsed


def parse_stage_epochs(value: Any) -> tuple[int | None, int | None]:
    """A two-stage strategy's ``stage_epochs`` option: one count for both stages or ``E1,E2``
    (None: the run's epoch count for each)."""
    if value is None:
        return None, None
    parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else (
        list(value) if isinstance(value, (list, tuple)) else [value])
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise UsageError(f"strategy option stage_epochs={value!r}: give one count for both stages or two, e.g. 10,5")
    first, second = (parse_option("stage_epochs", p, int, minimum=1) for p in parts)
    return first, second


def _adapter_name(model: Any) -> str:
    spec = getattr(model, "spec", None)
    if isinstance(spec, Mapping) and isinstance(spec.get("adapter"), str):
        return spec["adapter"]
    return type(getattr(model, "adapter", None)).__name__


def _count(module: Any) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "FROZEN",
    "TRAINABLE",
    "Stage",
    "Strategy",
    "apply_stage",
    "build_strategy",
    "check_adapter",
    "check_compatible",
    "label_summary",
    "labels_for",
    "param_groups",
    "parse_option",
    "parse_stage_epochs",
    "strategy_metadata",
    "train_all",
    "train_only",
]
