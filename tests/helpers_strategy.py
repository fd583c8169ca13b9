"""Tiny real models for the strategy / functional tests: ``build_model`` on timm's
``test_vit``/``test_convnext`` with random weights at 32 px."""

from __future__ import annotations

import torch

from cdft_core.models.model import CdftModel, build_model

IMAGE_SIZE = 32
NUM_CLASSES = 3


def tiny_model(backbone: str = "test_vit", adapter: str = "none", num_classes: int = NUM_CLASSES, seed: int = 0) -> CdftModel:
    torch.manual_seed(seed)
    return build_model(backbone, adapter, num_classes, pretrained=False, image_size=IMAGE_SIZE)


def tiny_batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    return x, y
