"""Building an ``hf-hub:ORG/NAME[@REV]`` backbone from its config.json (see :mod:`cdft_core.models.hub_config`).

The architecture, its ``model_args`` and the preprocessing come from the repo's
``config.json`` (hub or local cache); timm builds the model with the hub's cfg overlaid on
the architecture's default (``pretrained_cfg_overlay``, timm's own mechanism), and the
weights — the config's snapshot, safetensors first, or a ``--weights`` file — go through
cdft's strict loader (:func:`~cdft_core.models.backbone.load_backbone_weights`), because
timm's own loader ignores missing and unexpected keys once the classifier is removed.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import timm
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg
from torch import nn

from cdft_core.models.backbone import (
    TimmBackbone,
    create_timm_model,
    data_config_entry,
    hub_filenames,
    load_source,
    timm_family,
)
from cdft_core.models.hub_config import CONFIG_FILE, HubConfig, hub_config
from cdft_core.models.weights import resolve_hub_file, weight_source


def hub_pretrained_cfg(hub: HubConfig) -> dict[str, Any]:
    """The architecture's default timm cfg overlaid with the hub's (what ``pretrained_cfg_overlay`` gives)."""
    default = get_pretrained_cfg(hub.architecture)
    return {**(default.to_dict() if default is not None else {}), **hub.pretrained_cfg}


def hub_data_config(hub: HubConfig, image_size: int | None = None, *, note: str = "") -> dict[str, Any]:
    resolved = resolve_data_config(pretrained_cfg=hub_pretrained_cfg(hub))
    source = f"{CONFIG_FILE} of hub repo {hub.weights_repo} ({hub.origin})" + (f" ({note})" if note else "")
    return data_config_entry(resolved, image_size, source)


def build_hub_backbone(
    name: str,
    *,
    pretrained: bool = True,
    weights: str | None = None,
    image_size: int | None = None,
    grad_checkpointing: bool = False,
) -> TimmBackbone:
    """An ``hf-hub:ORG/NAME[@REV]`` model: architecture, ``model_args`` and preprocessing from its config.json.

    timm builds it (``pretrained_cfg_overlay`` carries the hub's cfg into ``model.pretrained_cfg``);
    the weights (the config's snapshot, safetensors first, or ``--weights``) go through
    cdft's strict loader, because timm's own drops mismatched keys silently once the
    classifier is removed. ``--no-pretrained`` needs only config.json.
    """
    hub = hub_config(name)
    merged = hub_pretrained_cfg(hub)
    size = int(image_size) if image_size else int(merged.get("input_size", (3, 224, 224))[-1])
    kwargs: dict[str, Any] = {**_layer_args(hub.model_args), "num_classes": 0}
    if image_size and (merged.get("fixed_input_size") or "img_size" in hub.model_args):
        kwargs["img_size"] = size
    filenames = hub_filenames(hub.pretrained_cfg.get("hf_hub_filename"))
    source = weight_source(name, pretrained=pretrained, weights=weights, locate=lambda: (
        resolve_hub_file(name, hub.weights_repo, filenames, gated=hub.gated), f"hub:{hub.repo_id}"))
    model = create_timm_model(hub.architecture, name, kwargs, pretrained_cfg_overlay=dict(hub.pretrained_cfg))
    backbone = TimmBackbone(
        model, name=name, family=timm_family(hub.architecture), image_size=size,
        data_config=hub_data_config(hub, size, note=source.note), weights=source.source,
    )
    backbone.hub_config = hub
    load_source(backbone, source)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return backbone


def _layer_args(model_args: Mapping[str, Any]) -> dict[str, Any]:
    """JSON cannot hold a layer: ``"mlp_layer": "SwiGLUPacked"`` names one of timm.layers or
    torch.nn (a class, or a ``functools.partial`` such as timm's ``SwiGLUPacked``), also spelt
    in full (``"timm.layers.SwiGLUPacked"``, ``"torch.nn.SiLU"``). A name neither has is
    passed on as it is: timm resolves some layer names itself (``"gelu"``)."""
    out = dict(model_args)
    for key, value in model_args.items():
        if key.endswith("_layer") and isinstance(value, str):
            found = _named_layer(value)
            if found is not None:
                out[key] = found
    return out


def _named_layer(name: str) -> Any:
    short = name.rsplit(".", 1)[-1]
    modules = {"timm.layers": timm.layers, "torch.nn": nn, "nn": nn}
    prefix = name.rsplit(".", 1)[0] if "." in name else None
    for module in ([modules[prefix]] if prefix in modules else [] if prefix else [timm.layers, nn]):
        found = getattr(module, short, None)
        if isinstance(found, type) or (isinstance(found, functools.partial) and isinstance(found.func, type)):
            return found  # a layer class, or one with arguments bound; not a function such as gelu
    return None
