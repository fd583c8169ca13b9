"""Built-in plugin: the paper's timm backbones by name, and every other timm model on demand.

The five timm rows of docs/method.md#backbones are registered with their family and pretraining source;
their data config (mean, std, input size, interpolation) comes from timm's pretrained
cfg, computed only when read (``cdft_core.Lazy``) so that ``cdft list`` never imports
timm. Any other timm name (``convnext_small.fb_in22k``, a bare ``vit_small_patch16_224``
which means its default tag) resolves through ``register.resolver``; ``cdft list
backbones --all`` or a pattern shows timm's catalogue of pretrained names.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from cdft_core import Lazy, hookimpl

#: name -> (family, pretraining source, description)
PAPER_ROWS: dict[str, tuple[str, str, str]] = {
    "vit_base_patch16_clip_224.laion2b": (
        "vit", "LAION-2B (CLIP)", "ViT-B/16 CLIP image tower trained on LAION-2B",
    ),
    "vit_base_patch16_clip_224.openai": (
        "vit", "OpenAI CLIP (WIT-400M)", "ViT-B/16 OpenAI CLIP image tower (the paper's 'LAION-400M' ViT row)",
    ),
    "vit_base_patch16_224.augreg_in21k": (
        "vit", "ImageNet-21k", "ViT-B/16 supervised on ImageNet-21k (AugReg)",
    ),
    "convnext_base.clip_laion2b_augreg": (
        "convnext", "LAION-2B (CLIP)", "ConvNeXt-B CLIP image tower trained on LAION-2B",
    ),
    "convnext_base.fb_in22k": (
        "convnext", "ImageNet-22k", "ConvNeXt-B supervised on ImageNet-22k",
    ),
}


def build(name: str, **options: Any) -> Any:
    """The backbone factory: ``build(name, pretrained=..., weights=..., image_size=..., grad_checkpointing=...)``."""
    from cdft_core import build_timm_backbone

    return build_timm_backbone(name, **options)


def data_config(name: str) -> dict[str, Any]:
    from cdft_core import timm_data_config

    return timm_data_config(name)


def claim(name: str) -> dict[str, Any] | None:
    """Any timm model name; a bare architecture resolves to its default pretrained tag."""
    from cdft_core import canonical_timm_name, timm_family

    canonical = canonical_timm_name(name)
    if canonical is None:
        return None
    tag = canonical.partition(".")[2]
    return {
        "name": canonical,
        "factory": partial(build, canonical),
        "description": f"timm {canonical}",
        "metadata": {
            "family": timm_family(canonical),
            "pretraining": f"timm tag {tag}" if tag else "none (no pretrained weights in timm)",
            "source": "timm",
            "data_config": Lazy(partial(data_config, canonical)) if tag else None,
        },
    }


def catalogue() -> list[str]:
    import timm

    return timm.list_models(pretrained=True)


@hookimpl
def register_backbones(register):
    for name, (family, pretraining, description) in PAPER_ROWS.items():
        register(
            name,
            partial(build, name),
            description=description,
            metadata={
                "family": family,
                "pretraining": pretraining,
                "source": "timm",
                "paper": True,
                "data_config": Lazy(partial(data_config, name)),
            },
        )
    register.resolver(claim, catalogue=catalogue, description="a timm model (timm.list_models(pretrained=True))")
