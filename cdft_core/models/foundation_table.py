"""The curated pathology foundation models as data: torch-free, so `cdft list` can show them.

Creation arguments, preprocessing and licences come from each model's Hugging Face model
card (``FoundationModel.card``); docs/models.md#pathology-foundation-models lists them.
Building is in :mod:`cdft_core.models.foundation`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cdft_core.errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}


@dataclass(frozen=True)
class FoundationModel:
    """One curated row: what ``timm.create_model`` needs, and what the card says about it."""

    architecture: str
    hub: str
    kwargs: Mapping[str, Any]
    description: str
    licence: str
    gated: bool
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pooling: str = "token"  # "token" (class token) or "token+mean" (class token ++ mean of patch tokens)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def card(self) -> str:
        return f"https://huggingface.co/{self.hub}"


FOUNDATION_MODELS: dict[str, FoundationModel] = {
    "uni": FoundationModel(
        "vit_large_patch16_224", "MahmoodLab/UNI",
        {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
        "UNI: ViT-L/16 DINOv2-trained on 100k slides (Mass General Brigham)", "CC-BY-NC-ND-4.0", True,
    ),
    "uni2-h": FoundationModel(
        "vit_giant_patch14_224", "MahmoodLab/UNI2-h",
        {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "embed_dim": 1536, "init_values": 1e-5,
         "mlp_ratio": 2.66667 * 2, **SWIGLU, "reg_tokens": 8, "no_embed_class": True, "dynamic_img_size": True},
        "UNI2-h: ViT-H/14 (1536 wide, 8 registers) on 350k slides", "CC-BY-NC-ND-4.0", True,
    ),
    "virchow2": FoundationModel(
        "vit_huge_patch14_224", "paige-ai/Virchow2",
        {"img_size": 224, "init_values": 1e-5, **SWIGLU, "reg_tokens": 4, "mlp_ratio": 5.3375},
        "Virchow2: ViT-H/14 (4 registers) on 3.1M slides; embedding = class token ++ mean patch token",
        "CC-BY-NC-ND-4.0", True, pooling="token+mean",
    ),
    "h-optimus-0": FoundationModel(
        "vit_giant_patch14_reg4_dinov2", "bioptimus/H-optimus-0",
        {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
        "H-optimus-0: ViT-g/14 (4 registers) on 500k slides (Bioptimus)", "Apache-2.0", False,
        mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
    ),
    "h-optimus-1": FoundationModel(
        "vit_giant_patch14_reg4_dinov2", "bioptimus/H-optimus-1",
        {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
        "H-optimus-1: ViT-g/14 (4 registers) on 1M+ slides (Bioptimus)", "non-commercial, gated", True,
        mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
    ),
    "prov-gigapath": FoundationModel(
        "vit_giant_patch14_dinov2", "prov-gigapath/prov-gigapath",
        {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
         "init_values": 1e-5, "mlp_ratio": 5.33334},
        "Prov-GigaPath tile encoder: ViT-g/16 on 1.3B tiles (Providence)", "Apache-2.0 with restrictions", True,
    ),
}


def foundation_model(name: str) -> FoundationModel:
    try:
        return FOUNDATION_MODELS[name]
    except KeyError:
        raise UsageError(f"{name!r} is not a curated foundation model; known: {', '.join(FOUNDATION_MODELS)}") from None


def foundation_data_config(name: str, image_size: int | None = None, *, note: str = "") -> dict[str, Any]:
    row = foundation_model(name)
    size = int(image_size or row.kwargs.get("img_size", 224))
    return {
        "input_size": (3, size, size),
        "mean": row.mean,
        "std": row.std,
        "interpolation": "bicubic",
        "source": f"model card {row.card}" + (f" ({note})" if note else ""),
    }
