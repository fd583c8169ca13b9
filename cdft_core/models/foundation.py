"""Curated pathology foundation models: timm ViTs built with their model cards' creation arguments.

Each row names the timm architecture, the extra ``timm.create_model`` arguments its Hugging
Face model card gives (layer scale, register tokens, SwiGLU MLPs...), the preprocessing and
the hub repo of its weights. Building one never needs the hub: ``pretrained=False`` gives
random weights, ``weights=PATH`` a local file, and the weights are loaded strictly
(:func:`~cdft_core.models.weights.load_state_dict_checked`), so a file made for other
creation arguments fails with one line instead of running half-initialised. See
docs/models.md#pathology-foundation-models for the cards and their licences.
"""

from __future__ import annotations

import contextlib
from typing import Any

import timm
import torch
from torch import Tensor

from cdft_core.models.backbone import TimmBackbone, hub_filenames, load_source
from cdft_core.models.foundation_table import foundation_data_config, foundation_model
from cdft_core.models.weights import resolve_hub_file, weight_source


def create_kwargs(name: str, image_size: int | None = None) -> dict[str, Any]:
    """``timm.create_model`` arguments of a row, layer classes resolved, head removed."""
    row = foundation_model(name)
    kwargs = dict(row.kwargs, num_classes=0)
    if image_size:
        kwargs["img_size"] = int(image_size)
    if kwargs.get("mlp_layer") == "SwiGLUPacked":
        kwargs["mlp_layer"] = timm.layers.SwiGLUPacked
    if kwargs.get("act_layer") == "SiLU":
        kwargs["act_layer"] = torch.nn.SiLU
    return kwargs


class FoundationBackbone(TimmBackbone):
    """A :class:`TimmBackbone` whose pooled features may be class token ++ mean patch token (Virchow2)."""

    def __init__(self, model: torch.nn.Module, *, pooling: str, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.pooling = pooling
        if pooling == "token+mean":
            self.pooled_dim = 2 * self.dim

    def _pool(self, feats: Tensor) -> Tensor:
        if self.pooling == "token+mean":
            return torch.cat([feats[:, 0], self._to_tokens(feats).mean(1)], dim=-1)
        return self.model.forward_head(feats, pre_logits=True)

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.model.forward_features(x)
        return self._to_tokens(feats), self._pool(feats)

    def pooled(self, x: Tensor) -> Tensor:
        return self._pool(self.model.forward_features(x))


def build_foundation_backbone(
    name: str,
    *,
    pretrained: bool = True,
    weights: str | None = None,
    image_size: int | None = None,
    grad_checkpointing: bool = False,
    device: str | torch.device | None = None,
) -> FoundationBackbone:
    """A curated row by name; ``device="meta"`` builds shapes only (no memory, no weights)."""
    row = foundation_model(name)
    source = weight_source(name, pretrained=pretrained, weights=weights, locate=lambda: (
        resolve_hub_file(name, row.hub, hub_filenames(None), gated=row.gated), f"hub:{row.hub}"))
    # no device named: the caller's (preflight builds every backbone under torch.device("meta"))
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = timm.create_model(row.architecture, pretrained=False, **create_kwargs(name, image_size))
    size = int(image_size or row.kwargs.get("img_size", 224))
    backbone = FoundationBackbone(
        model, pooling=row.pooling, name=name, family="vit", image_size=size,
        data_config=foundation_data_config(name, size, note=source.note), weights=source.source,
    )
    load_source(backbone, source)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return backbone
