"""Tiny models for the strategy / functional tests.

``tiny_model`` builds the real :class:`cdft_core.model.CdftModel` when that module is
available, and otherwise a stand-in with the same layout (``backbone``/``adapter``/``head``
children, ``backbone_frozen``) around timm's ``test_vit``/``test_convnext``.
"""

from __future__ import annotations

import torch
from torch import nn

IMAGE_SIZE = 32
NUM_CLASSES = 3


class _StandInModel(nn.Module):
    def __init__(self, backbone: str, adapter: str, num_classes: int) -> None:
        import timm

        super().__init__()
        kwargs = {"img_size": IMAGE_SIZE} if "vit" in backbone else {}
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0, **kwargs)
        dim = self.backbone.num_features
        self.adapter = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)) if adapter != "none" else nn.Identity()
        self.head = nn.Linear(dim, num_classes)
        self.backbone_frozen = False
        self.spec = {"backbone": backbone, "adapter": adapter, "num_classes": num_classes}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone_frozen:
            self.backbone.eval()
            with torch.no_grad():
                features = self.backbone(x)
        else:
            features = self.backbone(x)
        return self.head(self.adapter(features))


def tiny_model(backbone: str = "test_vit", adapter: str = "none", num_classes: int = NUM_CLASSES, seed: int = 0) -> nn.Module:
    import importlib.util

    torch.manual_seed(seed)
    # TODO(transition): use the real model once its backbone/adapter plugins have landed
    if not all(importlib.util.find_spec(m) for m in ("cdft_core.model", "cdft_plugins.timm_backbones", "cdft_plugins.adapters")):
        return _StandInModel(backbone, adapter, num_classes)
    from cdft_core.model import build_model

    return build_model(backbone, adapter, num_classes, pretrained=False, image_size=IMAGE_SIZE)


def tiny_batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    return x, y
