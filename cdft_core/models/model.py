"""The cdft model: backbone → adapter → linear head, built from registry names.

Parameter names are part of the checkpoint format and stay stable:

- ``backbone.model.<timm name>``: the timm model (for open_clip rows, the visual trunk);
- ``adapter.<name>``: the adapter's own parameters (``none`` has none; CDTM's are listed in
  :mod:`cdft_core.models.adapters`);
- ``head.weight``, ``head.bias``: ``Linear(adapter.out_dim → num_classes)``.

``model.spec`` is a JSON-safe description from which :func:`model_from_spec` rebuilds the
same architecture (random init, nothing downloaded) for loading a checkpoint, and
``model.data_config`` is the preprocessing the backbone expects; both travel in every
checkpoint so evaluation uses exactly what training used.

An adapter factory (what a plugin registers) has the signature::

    factory(*, dim: int, num_tokens: int, pooled_dim: int, **options) -> nn.Module

and returns a module with an ``out_dim`` attribute whose ``forward(tokens, pooled)`` maps
the backbone's tokens (B×N×C) and pooled features (B×pooled_dim) to B×out_dim.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from cdft_core.errors import CdftError, PluginUnavailable, UsageError
from cdft_core.registry import get_registry
from cdft_core.text import jsonable, parse_bool

#: Version of the ``spec`` layout; :func:`model_from_spec` refuses newer ones.
SPEC_FORMAT = 1

DATA_CONFIG_KEYS = ("input_size", "mean", "std", "interpolation")


class Features(NamedTuple):
    """A frozen backbone's outputs for a batch, as the feature cache stores them
    (:mod:`cdft_core.training.frozen`): ``tokens`` (B×N×C) and ``pooled`` (B×C), either
    None when the adapter does not read it. ``CdftModel(features)`` runs the adapter and
    the head only, so the training and evaluation loops take a batch of them where they
    take a batch of images."""

    tokens: Tensor | None
    pooled: Tensor | None

    def to(self, device: Any, *args: Any, non_blocking: bool = False, **kwargs: Any) -> Features:
        """Both parts on ``device``, dtype unchanged (image options such as ``memory_format`` do not apply)."""
        return Features(*(None if t is None else t.to(device, non_blocking=non_blocking) for t in self))

    @property
    def shape(self) -> torch.Size:
        """The batch's leading shape (B, ...), as an image batch has one."""
        return next(t for t in self if t is not None).shape


class CdftModel(nn.Module):
    """``head(adapter(*backbone.features(x)))``, with an optional frozen backbone.

    ``frozen_modules`` (set by :func:`cdft_core.strategy.apply_stage` from a stage's labels)
    names the modules whose parameters are all frozen: they stay in eval mode (dropout,
    drop-path and BatchNorm statistics as at inference) even when ``model.train()`` is
    called, so frozen means frozen for buffers too — also for a stage that trains only part
    of the backbone. ``backbone_frozen = True`` (no backbone parameter trains) also runs the
    backbone under ``torch.no_grad()``: no activation memory, no gradient work.
    """

    def __init__(
        self,
        backbone: nn.Module,
        adapter: nn.Module,
        head: nn.Linear,
        *,
        data_config: Mapping[str, Any],
        spec: Mapping[str, Any],
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter
        self.head = head
        self.data_config = dict(data_config)
        self.spec = dict(spec)
        self._backbone_frozen = False
        self._frozen_modules: tuple[str, ...] = ()

    @property
    def frozen_modules(self) -> tuple[str, ...]:
        return self._frozen_modules

    @frozen_modules.setter
    def frozen_modules(self, names: tuple[str, ...]) -> None:
        self._frozen_modules = tuple(names)
        self.train(self.training)

    @property
    def backbone_frozen(self) -> bool:
        return self._backbone_frozen

    @backbone_frozen.setter
    def backbone_frozen(self, frozen: bool) -> None:
        self._backbone_frozen = bool(frozen)
        self.backbone.train(self.training and not self._backbone_frozen)

    def train(self, mode: bool = True) -> CdftModel:
        super().train(mode)
        if mode:
            for name in self._frozen_modules:
                self.get_submodule(name).eval()
            if self._backbone_frozen:
                self.backbone.eval()
        return self

    def training_batchnorms(self) -> list[str]:
        """The BatchNorm layers that ``train()`` leaves in train mode (not frozen).

        Why: each of them normalises a batch with that batch's own statistics, so
        ``--accumulate`` micro-batches cannot take the step of one larger batch.
        """
        frozen = (*self._frozen_modules, *(("backbone",) if self._backbone_frozen else ()))
        return [name for name, module in self.named_modules()
                if isinstance(module, nn.modules.batchnorm._BatchNorm)
                and not any(name == f or name.startswith(f + ".") for f in frozen)]

    def features(self, x: Tensor) -> Tensor:
        """What the head sees (B×adapter.out_dim): one backbone pass, then the adapter."""
        if self._backbone_frozen:
            with torch.no_grad():
                tokens, pooled = self.backbone.features(x)
        else:
            tokens, pooled = self.backbone.features(x)
        return self.adapter(tokens, pooled)

    def forward(self, x: Tensor | Features) -> Tensor:
        """Logits of a batch of images, or of a frozen backbone's stored :class:`Features`."""
        if isinstance(x, Features):
            return self.head(self.adapter(x.tokens, x.pooled))
        return self.head(self.features(x))


def build_model(
    backbone: str,
    adapter: str,
    num_classes: int,
    *,
    pretrained: bool = True,
    weights: str | None = None,
    image_size: int | None = None,
    grad_checkpointing: bool = False,
    adapter_options: Mapping[str, Any] | None = None,
    registry: Any = None,
) -> CdftModel:
    """Resolve the names, build the backbone (weights as asked), the adapter for its tokens, the head.

    ``adapter_options`` values may be strings (from ``--adapter-option K=V``); they are
    converted to the type of the option's registered default. ``grad_checkpointing`` is
    passed to the backbone; the CDTM has its own ``checkpoint_blocks`` option.
    """
    if int(num_classes) != num_classes or num_classes < 1:
        raise UsageError(f"num_classes must be a positive integer, got {num_classes!r}")
    if image_size is not None and (int(image_size) != image_size or image_size < 8):
        raise UsageError(f"image size must be an integer of at least 8 pixels, got {image_size!r}")
    registry = registry if registry is not None else get_registry()
    backbone_component = registry.get("backbone", backbone)
    adapter_component = registry.get("adapter", adapter)
    options = resolve_adapter_options(adapter_component, adapter_options)

    with _named(backbone_component, "failed to build"):
        bb = backbone_component.factory(
            pretrained=pretrained, weights=weights, image_size=image_size, grad_checkpointing=grad_checkpointing
        )
    data_config = _checked_data_config(bb, backbone_component.name)
    size = int(getattr(bb, "image_size", None) or data_config["input_size"][-1])
    num_tokens = int(bb.num_tokens(size))
    pooled_dim = int(getattr(bb, "pooled_dim", bb.dim))
    with _named(adapter_component, "failed to build"):
        ad = adapter_component.factory(dim=int(bb.dim), num_tokens=num_tokens, pooled_dim=pooled_dim, **options)
    out_dim = getattr(ad, "out_dim", None)
    if not isinstance(out_dim, int) or out_dim < 1:
        raise CdftError(f"adapter {adapter_component.name!r} (plugin {adapter_component.provider!r}) has no positive integer out_dim")
    _check_adapter_output(ad, adapter_component, dim=int(bb.dim), num_tokens=num_tokens, pooled_dim=pooled_dim)
    head = nn.Linear(out_dim, int(num_classes))
    spec = {
        "format": SPEC_FORMAT,
        "backbone": backbone_component.name,
        "adapter": adapter_component.name,
        "adapter_options": jsonable(options),
        "num_classes": int(num_classes),
        "image_size": size,
        "grad_checkpointing": bool(grad_checkpointing),
        "data_config": jsonable(data_config),
        "weights": str(getattr(bb, "weights", "pretrained" if pretrained else "random init")),
        "dim": int(bb.dim),
        "num_tokens": num_tokens,
    }
    if getattr(bb, "hub_config", None) is not None:  # an hf-hub: name: rebuilt from this, no hub or cache needed
        from cdft_core.models.hub_config import recorded_config

        spec["hub_config"] = recorded_config(bb.hub_config)
    return CdftModel(bb, ad, head, data_config=data_config, spec=spec)


@contextlib.contextmanager
def _named(component: Any, what: str) -> Iterator[None]:
    """An unexpected error of a plugin's factory says which component failed (cdft's own
    one-line errors pass through unchanged)."""
    try:
        yield
    except (CdftError, PluginUnavailable):
        raise
    except Exception as exc:
        raise CdftError(f"{component.kind} {component.name!r} (plugin {component.provider!r}) {what}: "
                        f"{type(exc).__name__}: {exc}") from exc


def _check_adapter_output(adapter: nn.Module, component: Any, *, dim: int, num_tokens: int, pooled_dim: int) -> None:
    """Run the adapter once on zeros shaped like the backbone's outputs and compare with its
    ``out_dim``: a wrong ``out_dim`` otherwise surfaces mid-training as a bare matrix-size
    error after the run directory exists. Eval mode and zeros: no random draw, no state change."""
    was_training = adapter.training
    adapter.eval()
    device = next(iter(adapter.parameters()), torch.empty(0)).device
    try:
        with torch.no_grad(), _named(component, f"failed on zeros shaped like the backbone's tokens (1×{num_tokens}×{dim}) "
                                                f"and pooled features (1×{pooled_dim})"):
            out = adapter(torch.zeros(1, num_tokens, dim, device=device), torch.zeros(1, pooled_dim, device=device))
    finally:
        adapter.train(was_training)
    if tuple(out.shape) != (1, adapter.out_dim):
        raise CdftError(f"adapter {component.name!r} (plugin {component.provider!r}) declares out_dim {adapter.out_dim} "
                        f"but returns features of shape {tuple(out.shape)[1:]} per image; make out_dim the size of "
                        f"its output")


def model_from_spec(spec: Mapping[str, Any], registry: Any = None) -> CdftModel:
    """The architecture ``spec`` describes, randomly initialised and without any download.

    The caller loads the checkpoint's state dict into it. ``data_config`` and the weight
    source are taken from the spec as saved, never recomputed.
    """
    if not isinstance(spec, Mapping):
        raise CdftError("the model spec is not a JSON object; the checkpoint was not written by cdft, or it is corrupt")
    missing = [k for k in ("backbone", "adapter", "num_classes", "image_size", "data_config") if k not in spec]
    if missing:
        raise CdftError(f"model spec lacks {', '.join(missing)}; the checkpoint was not written by cdft")
    problem = _spec_problem(spec)
    if problem:
        raise CdftError(f"model spec has {problem}; the checkpoint was not written by this cdft, or it is corrupt")
    if int(spec.get("format", SPEC_FORMAT)) > SPEC_FORMAT:
        raise CdftError(f"model spec format {spec['format']} is newer than this cdft understands ({SPEC_FORMAT}); upgrade cdft")
    if isinstance(spec.get("hub_config"), Mapping):
        from cdft_core.models.hub_config import remember_recorded

        remember_recorded(str(spec["backbone"]), spec["hub_config"])
    model = build_model(
        spec["backbone"],
        spec["adapter"],
        int(spec["num_classes"]),
        pretrained=False,
        image_size=int(spec["image_size"]),
        grad_checkpointing=bool(spec.get("grad_checkpointing", False)),
        adapter_options=spec.get("adapter_options") or {},
        registry=registry,
    )
    for key in ("dim", "num_tokens"):
        if key in spec and int(spec[key]) != int(model.spec[key]):
            raise CdftError(
                f"backbone {spec['backbone']!r} now gives {key}={model.spec[key]} but the checkpoint was built with "
                f"{spec[key]}; install the timm/plugin version that wrote it"
            )
    from cdft_core.models.model_change import replay_change

    replay_change(model, spec, registry=registry)  # e.g. LoRA layers, before the tensors are loaded
    model.data_config = data_config_from_json(spec["data_config"])
    model.backbone.data_config = dict(model.data_config)
    model.spec = copy.deepcopy(dict(spec))
    return model


#: the most classes a saved spec may ask for: far above any real task, far below a head that fills memory
MAX_CLASSES = 100_000
#: the image sizes a saved spec may ask for (pixels per side)
IMAGE_SIZES = (8, 8192)


def _spec_problem(spec: Mapping[str, Any]) -> str | None:
    """What is wrong with a saved spec's fields, or None.

    A spec comes from a checkpoint's metadata, which anyone can edit: bad types must be one
    error line (not ``int('x')``), and sizes are bounded before any tensor is allocated (a
    ``num_classes`` of 4e8 would ask for a head of 100 GB).
    """
    from cdft_core.text import one_line

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def shown(value: Any) -> str:
        return one_line(repr(value), 60)

    for key in ("backbone", "adapter"):
        if not isinstance(spec[key], str) or not spec[key]:
            return f"a bad {key} ({shown(spec[key])}, not a name)"
    if not is_int(spec["num_classes"]) or not 1 <= spec["num_classes"] <= MAX_CLASSES:
        return f"a bad num_classes ({shown(spec['num_classes'])}, not an integer from 1 to {MAX_CLASSES})"
    low, high = IMAGE_SIZES
    if not is_int(spec["image_size"]) or not low <= spec["image_size"] <= high:
        return f"a bad image_size ({shown(spec['image_size'])}, not an integer from {low} to {high})"
    for key in ("format", "dim", "num_tokens"):
        if key in spec and not is_int(spec[key]):
            return f"a bad {key} ({shown(spec[key])}, not an integer)"
    data_config = spec["data_config"]
    if not isinstance(data_config, Mapping):
        return "a data_config that is not a JSON object"
    for key in ("input_size", "mean", "std"):
        if key in data_config and not isinstance(data_config[key], (list, tuple)):
            return f"a bad data_config.{key} ({shown(data_config[key])}, not a list)"
    if not isinstance(spec.get("adapter_options") or {}, Mapping):
        return "adapter_options that are not a JSON object"
    return None


def resolve_adapter_options(component: Any, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Registered defaults overlaid with ``options``; unknown names and bad values are usage errors."""
    given = dict(options or {})
    declared = component.metadata.get("options")
    if declared is None:
        return given  # the adapter declares no options: pass them through to its factory
    unknown = sorted(set(given) - set(declared))
    if unknown:
        known = ", ".join(f"{k}={v!r}" for k, v in declared.items()) or "none"
        raise UsageError(f"adapter {component.name!r} has no option {', '.join(unknown)}; its options: {known}")
    resolved = dict(declared)
    for key, value in given.items():
        resolved[key] = _coerce(value, declared[key], f"adapter {component.name!r} option {key!r}")
    return resolved


def data_config_from_json(config: Mapping[str, Any]) -> dict[str, Any]:
    """A saved data config with its sequences as tuples again (the in-memory form)."""
    out = dict(config)
    for key in ("input_size", "mean", "std"):
        if key in out:
            out[key] = tuple(out[key])
    return out


def _checked_data_config(backbone: Any, name: str) -> dict[str, Any]:
    config = getattr(backbone, "data_config", None)
    if not isinstance(config, Mapping) or any(k not in config for k in DATA_CONFIG_KEYS):
        raise CdftError(f"backbone {name!r} gives no complete data_config (needs {', '.join(DATA_CONFIG_KEYS)})")
    config = data_config_from_json(config)
    config.setdefault("source", f"backbone {name}")
    return config


def _coerce(value: Any, default: Any, what: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{what} must be a finite number, got {value!r}")
    if default is None or not isinstance(value, str):
        if isinstance(default, bool) and not isinstance(value, bool):
            raise UsageError(f"{what} must be true or false, got {value!r}")
        if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
            if value != int(value):
                raise UsageError(f"{what} must be an integer, got {value!r}")
            return int(value)
        return value
    text = value.strip()
    try:
        if isinstance(default, bool):
            return parse_bool(text, what=what)
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            number = float(text)
            if not math.isfinite(number):
                raise UsageError(f"{what} must be a finite number, got {value!r}")
            return number
    except ValueError:
        kind = {int: "an integer", float: "a number"}.get(type(default), type(default).__name__)
        raise UsageError(f"{what} must be {kind}, got {value!r}") from None
    return text

