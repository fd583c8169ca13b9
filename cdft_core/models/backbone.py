"""One token interface for every backbone, and the timm implementation of it.

The CDTM adapter needs the backbone's tokens (B×N×C), the ``none`` adapter its pooled
features (B×C). :class:`TimmBackbone` gives both from **one** ``forward_features`` call:

- tokens: a ViT's ``forward_features`` output without its class/register (prefix)
  tokens; a CNN's final feature map flattened to B×(H·W)×C (NHWC models included);
- pooled: the model's own pre-logits pooling, ``forward_head(features, pre_logits=True)``
  — the class token for timm's ViTs (``global_pool='token'``), and for ConvNeXt the mean
  over the feature map followed by the pretrained head LayerNorm;
- ``num_tokens(image_size)`` is derived from the model by a shape-only (meta-device)
  forward pass, so 196 and 49 are never constants: other sizes and variants just work.

The timm model is held as ``self.model``, so every backbone parameter is named
``backbone.model.<timm name>`` inside a :class:`~cdft_core.models.model.CdftModel`.

A backbone factory (what a plugin registers) has the signature::

    factory(*, pretrained: bool = True, weights: str | None = None,
            image_size: int | None = None, grad_checkpointing: bool = False) -> Backbone

This module imports torch and timm; plugins import it inside their factories only.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import timm
import torch
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg, is_model_in_modules, is_model_pretrained, split_model_name_tag
from torch import Tensor, nn

from cdft_core.errors import CdftError, UsageError
from cdft_core.models.hub_config import hub_config, is_hub_name
from cdft_core.models.weights import (
    LoadReport,
    WeightSource,
    creation_hint,
    hub_offline,
    load_state_dict_checked,
    offline_reason,
    resolve_hub_file,
    strip_prefix,
    weight_source,
)
from cdft_core.text import one_line

#: timm module name -> cdft family
FAMILIES: dict[str, str] = {"vision_transformer": "vit", "deit": "vit", "convnext": "convnext"}

#: Prefixes that wrap a whole backbone state dict in files people save (DDP's ``module.``,
#: a bare open_clip visual trunk). A cdft checkpoint's ``backbone.model.*`` keys are
#: picked out of the full model's keys (adapter and head are left aside).
WEIGHT_PREFIXES = ("module.", "model.", "visual.trunk.", "trunk.")
CDFT_BACKBONE_PREFIX = "backbone.model."


@runtime_checkable
class Backbone(Protocol):
    """What the model, the adapters and the engine use of a backbone (an ``nn.Module``)."""

    name: str  # canonical registry name
    dim: int  # channel dimension C of the tokens
    pooled_dim: int  # dimension of the pooled features
    image_size: int  # the image size the backbone was built for
    data_config: dict[str, Any]  # preprocessing: input_size, mean, std, interpolation, source
    family: str  # "vit", "convnext", or the timm module name
    weights: str  # where the weights came from ("random init", "hub:...", "file:...")

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]: ...  # (tokens B×N×C, pooled B×C), one pass

    def tokens(self, x: Tensor) -> Tensor: ...

    def pooled(self, x: Tensor) -> Tensor: ...

    def num_tokens(self, image_size: int | None = None) -> int: ...


class _FeaturesOnly(nn.Module):
    """``forward`` = ``forward_features``, so :func:`torch.func.functional_call` can run it on meta tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)


class TimmBackbone(nn.Module):
    """A timm model behind the token interface (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        family: str,
        image_size: int,
        data_config: Mapping[str, Any],
        weights: str,
    ) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.family = family
        self.image_size = int(image_size)
        self.data_config = dict(data_config)
        self.weights = weights
        self.load_report: LoadReport | None = None
        self.hub_config: Any = None  # an ``hf-hub:`` backbone's HubConfig (architecture, config.json read)
        self.dim = int(model.num_features)
        self.pooled_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
        self.channels_last_output = getattr(model, "output_fmt", "NCHW") == "NHWC"
        self._num_tokens: dict[int, int] = {}

    def _to_tokens(self, feats: Tensor) -> Tensor:
        if feats.ndim == 3:
            return feats[:, self.num_prefix_tokens :]
        if feats.ndim == 4:
            return feats.flatten(1, 2) if self.channels_last_output else feats.flatten(2).transpose(1, 2)
        raise CdftError(f"backbone {self.name!r} returned features of shape {tuple(feats.shape)}; expected 3-D or 4-D")

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(tokens B×N×C, pooled B×C) from one ``forward_features`` pass."""
        feats = self.model.forward_features(x)
        return self._to_tokens(feats), self.model.forward_head(feats, pre_logits=True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.features(x)

    def tokens(self, x: Tensor) -> Tensor:
        return self._to_tokens(self.model.forward_features(x))

    def pooled(self, x: Tensor) -> Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def num_tokens(self, image_size: int | None = None) -> int:
        """N for square images of ``image_size`` (default: the built size), from a shape-only pass."""
        size = int(image_size or self.image_size)
        if size not in self._num_tokens:
            wrapper = _FeaturesOnly(self.model)
            meta = {k: torch.empty_like(v, device="meta") for k, v in wrapper.state_dict(keep_vars=True).items()}
            # a batch of 2 in eval mode: BatchNorm refuses one value per channel in train mode
            x = torch.empty(2, int(self.data_config["input_size"][0]), size, size, device="meta")
            was_training = wrapper.training
            wrapper.eval()
            try:
                with torch.no_grad():
                    feats = torch.func.functional_call(wrapper, meta, (x,))
            except Exception as exc:
                raise UsageError(
                    f"backbone {self.name!r} (built for {self.image_size} px) cannot take {size} px images "
                    f"({one_line(exc)}); build it with image_size={size}"
                ) from exc
            finally:
                wrapper.train(was_training)
            self._num_tokens[size] = int(self._to_tokens(feats).shape[1])
        return self._num_tokens[size]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, family={self.family!r}, dim={self.dim}, image_size={self.image_size}"


# -- timm names, families, data configs ----------------------------------------------


def timm_family(name: str) -> str:
    """``vit``, ``convnext`` or the timm module that defines the architecture (of its config, for ``hf-hub:``)."""
    if is_hub_name(name):
        name = hub_config(name).architecture
    for module, family in FAMILIES.items():
        if is_model_in_modules(name, (module,)):  # a tuple: some timm 1.0.x assert one
            return family
    arch = split_model_name_tag(name)[0]
    return next((m for m in timm.list_modules() if is_model_in_modules(arch, (m,))), "other")


def canonical_timm_name(name: str) -> str | None:
    """The ``arch.tag`` spelling of a timm name (a bare arch gets its default tag), or None.

    A tag the architecture does not have is a usage error listing the tags it has. An
    ``hf-hub:ORG/NAME`` name is its own canonical spelling once its config.json is found
    (hub or local cache; else the one-line error of :mod:`cdft_core.models.hub_config`).
    """
    if is_hub_name(name):
        hub_config(name)
        return name
    if not timm.is_model(name):
        return None
    arch, tag = split_model_name_tag(name)
    if tag:
        if not is_model_pretrained(name):
            tags = [n.split(".", 1)[1] for n in timm.list_models(arch, pretrained=True) if "." in n]
            raise UsageError(
                f"timm model {arch!r} has no pretrained tag {tag!r}; tags: {', '.join(tags) or 'none'}"
            )
        return name
    cfg = get_pretrained_cfg(arch)
    return f"{arch}.{cfg.tag}" if cfg is not None and cfg.tag else arch


def data_config_entry(config: Mapping[str, Any], image_size: int | None, source: str) -> dict[str, Any]:
    """A resolved timm data config in cdft's form (tuples, floats), sized for ``image_size``."""
    input_size = tuple(int(v) for v in config["input_size"])
    if image_size:
        input_size = (input_size[0], int(image_size), int(image_size))
    return {
        "input_size": input_size,
        "mean": tuple(float(v) for v in config["mean"]),
        "std": tuple(float(v) for v in config["std"]),
        "interpolation": str(config["interpolation"]),
        "source": source,
    }


def timm_data_config(name: str, image_size: int | None = None, *, note: str = "") -> dict[str, Any]:
    """The preprocessing timm's pretrained cfg (or an ``hf-hub:`` config.json) gives, without building the model."""
    if is_hub_name(name):
        from cdft_core.models.hub_backbone import hub_data_config

        return hub_data_config(hub_config(name), image_size, note=note)
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        raise UsageError(f"timm model {name!r} has no pretrained config; its data config is unknown")
    resolved = resolve_data_config(pretrained_cfg=cfg.to_dict())
    source = f"timm pretrained cfg {cfg.architecture}.{cfg.tag}" if cfg.tag else f"timm pretrained cfg {cfg.architecture}"
    return data_config_entry(resolved, image_size, source + (f" ({note})" if note else ""))


def _default_image_size(cfg: Any) -> int:
    return int(cfg.input_size[-1]) if cfg is not None else 224


# -- building ------------------------------------------------------------------------


def build_timm_backbone(
    name: str,
    *,
    pretrained: bool = True,
    weights: str | None = None,
    image_size: int | None = None,
    grad_checkpointing: bool = False,
) -> TimmBackbone:
    """A timm model by name, with weights from the hub/cache, a file, or random init (``hf-hub:`` names too)."""
    if is_hub_name(name):
        from cdft_core.models.hub_backbone import build_hub_backbone

        return build_hub_backbone(
            name, pretrained=pretrained, weights=weights, image_size=image_size, grad_checkpointing=grad_checkpointing
        )
    canonical = canonical_timm_name(name)
    if canonical is None:
        raise UsageError(f"{name!r} is not a timm model name; see `cdft list backbones --all`")
    cfg = get_pretrained_cfg(canonical)
    size = int(image_size) if image_size else _default_image_size(cfg)
    kwargs: dict[str, Any] = {"num_classes": 0}
    if image_size and cfg is not None and cfg.fixed_input_size:
        kwargs["img_size"] = size  # ViTs build their position embedding for this size
    # Find the weights before building anything: a missing file fails in a second, not after a model build.
    source = weight_source(canonical, pretrained=pretrained, weights=weights, locate=lambda: locate_timm_weights(canonical, cfg))
    model = create_timm_model(canonical, canonical, kwargs)
    if cfg is not None:
        data_config = timm_data_config(canonical, size, note=source.note)
    else:
        data_config = data_config_entry(resolve_data_config(model=model), size, f"timm default cfg of {canonical} ({source.note})")
    backbone = TimmBackbone(
        model, name=canonical, family=timm_family(canonical), image_size=size, data_config=data_config,
        weights=source.source,
    )
    if source.kind == "url" and cfg.custom_load and not source.path.endswith(".safetensors"):
        model.load_pretrained(source.path)  # e.g. big_vision .npz files: timm's own reader
        backbone.load_report = LoadReport(source=source.origin, loaded=len(model.state_dict()))
    else:
        load_source(backbone, source)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return backbone


def create_timm_model(architecture: str, name: str, kwargs: Mapping[str, Any], **extra: Any) -> nn.Module:
    """``timm.create_model`` without weights; creation arguments it refuses are one usage-error line.

    A hub config.json's ``model_args`` are untrusted: an unknown argument (TypeError) and an
    impossible value (timm asserts, e.g. a width its head count does not divide) alike.
    """
    try:
        return timm.create_model(architecture, pretrained=False, **extra, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        shown = {k: v for k, v in kwargs.items() if k != "num_classes"}
        raise UsageError(
            f"backbone {name!r}: timm model {architecture!r} cannot be built with {shown}: {one_line(exc)}"
        ) from exc


def load_source(backbone: TimmBackbone, source: WeightSource) -> None:
    """Load the chosen weights (if any) strictly into ``backbone.model``; keeps the report."""
    state_dict = source.state_dict()
    if state_dict is not None:
        backbone.load_report = load_backbone_weights(backbone.model, state_dict, name=backbone.name, source=source.origin)


def hub_filenames(filename: str | None) -> list[str]:
    """Candidate files of a hub repo, safetensors first (the order timm and open_clip use)."""
    names = {
        None: ["model.safetensors", "pytorch_model.bin"],
        "pytorch_model.bin": ["model.safetensors", "pytorch_model.bin"],
        "open_clip_pytorch_model.bin": ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"],
    }
    if filename in names:
        return names[filename]
    if filename.endswith((".bin", ".pth")):
        return [filename.rsplit(".", 1)[0] + ".safetensors", filename]
    return [filename]


def locate_timm_weights(name: str, cfg: Any) -> tuple[str, str]:
    """(local path, ``hub:<repo>`` or ``url:<url>``) of ``name``'s pretrained weights: HF cache/hub, else torch hub cache."""
    if cfg is None:
        raise UsageError(f"timm model {name!r} has no pretrained weights; use --no-pretrained or --weights PATH")
    if cfg.hf_hub_id:
        path = resolve_hub_file(name, cfg.hf_hub_id, hub_filenames(cfg.hf_hub_filename))
        return path, f"hub:{cfg.hf_hub_id}"
    if cfg.url:
        return _download_url(name, cfg.url), f"url:{cfg.url}"
    raise UsageError(f"timm model {name!r} lists no weight location; use --weights PATH or --no-pretrained")


def _download_url(name: str, url: str) -> str:
    """Weights published only at a URL (rare in timm 1.x): torch hub's cache, else a download."""
    cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url.split("?")[0]))
    if os.path.isfile(cache):
        return cache
    if hub_offline():
        raise CdftError(
            f"no pretrained weights for backbone {name!r} in the torch hub cache {cache} ({offline_reason()}); "
            f"pass --weights PATH or use --no-pretrained"
        )
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        torch.hub.download_url_to_file(url, cache, progress=False)
    except Exception as exc:
        raise CdftError(
            f"cannot download weights for backbone {name!r} from {url} ({one_line(exc)}); "
            f"pass --weights PATH or use --no-pretrained"
        ) from exc
    return cache


def _checkpoint_filter(model: nn.Module) -> Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]] | None:
    """timm's converter for this architecture (original-repo layouts, position-embedding resizing)."""
    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


def load_backbone_weights(model: nn.Module, state_dict: Mapping[str, Tensor], *, name: str, source: str) -> LoadReport:
    """Load a timm-layout (or timm-convertible) state dict into ``model``; one-line errors.

    The pretrained classifier (timm cfg ``classifier``, e.g. CLIP's 512-wide projection)
    is dropped: cdft's own head replaces it.
    """
    sd = strip_prefix(state_dict, ("module.",))
    if any(k.startswith(CDFT_BACKBONE_PREFIX) for k in sd):
        sd = {k[len(CDFT_BACKBONE_PREFIX):]: v for k, v in sd.items() if k.startswith(CDFT_BACKBONE_PREFIX)}
    own = model.state_dict()
    sd = strip_prefix(sd, [p for p in WEIGHT_PREFIXES if not any(k.startswith(p) for k in own)])
    converter = _checkpoint_filter(model)
    if converter is not None:
        try:
            sd = converter(dict(sd), model)
        except Exception as exc:
            # keys on one side only name the creation argument that differs (reg_tokens...)
            odd = [k for k in sd if k not in own] + [k for k in own if k not in sd]
            hint = creation_hint(odd) if odd else "the file is for another architecture — pick the matching backbone name"
            raise CdftError(
                f"weights {source} do not fit backbone {name!r} ({type(exc).__name__}: {one_line(exc)}); {hint}"
            ) from exc
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    heads = tuple(c + "." for c in ([classifier] if isinstance(classifier, str) else classifier))
    return load_state_dict_checked(model, sd, model=name, source=source, ignore=lambda key: key.startswith(heads))

