"""Built-in plugin: the paper's timm backbones by name, and every other timm model on demand.

The five timm rows of docs/method.md#backbones are registered with their family and pretraining source;
their data config (mean, std, input size, interpolation) comes from timm's pretrained
cfg, computed only when read (``cdft_core.Lazy``) so that ``cdft list`` never imports
timm. Any other timm name (``convnext_small.fb_in22k``, a bare ``vit_small_patch16_224``
which means its default tag) resolves through ``register.resolver``; ``cdft list
backbones --all`` or a pattern shows timm's catalogue of pretrained names. So does any
``hf-hub:ORG/NAME[@REV]`` name, from its repo's config.json on the hub or in the local
Hugging Face cache (docs/models.md#hub-names-hf-hub).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from cdft_core import Lazy, hookimpl

HUB_PREFIX = "hf-hub:"

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

    if name.startswith(HUB_PREFIX):
        return claim_hub(name)
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


def claim_hub(name: str) -> dict[str, Any] | None:
    """``hf-hub:ORG/NAME[@REV]``: the timm model its config.json describes (hub, else local cache).

    A curated foundation row's repo without a revision is left to the foundation plugin,
    whose row carries creation arguments the repo's config.json may lack.
    """
    from cdft_core import FOUNDATION_MODELS, canonical_timm_name, timm_family

    repo, _, revision = name[len(HUB_PREFIX):].partition("@")
    if not revision and any(row.hub.lower() == repo.lower() for row in FOUNDATION_MODELS.values()):
        return None
    canonical = canonical_timm_name(name)  # finds config.json, or one line saying why not
    built = Lazy(partial(_meta_backbone, canonical))
    return {
        "name": canonical,
        "factory": partial(build, canonical),
        "description": f"timm model from hub repo {repo}" + (f" at revision {revision}" if revision else ""),
        "metadata": {
            "family": timm_family(canonical),
            "pretraining": f"hub repo {repo} (see its model card)",
            "source": "hf-hub",
            "architecture": Lazy(lambda: built.get().hub_config.architecture),
            "model_args": Lazy(lambda: dict(built.get().hub_config.model_args)),
            "config": Lazy(lambda: built.get().hub_config.describe()),
            "weights": Lazy(lambda: built.get().hub_config.weights_status()),
            "data_config": Lazy(partial(data_config, canonical)),
            "embedding_width": Lazy(lambda: built.get().dim),
            "pooled_width": Lazy(lambda: built.get().pooled_dim),
            "tokens": Lazy(lambda: built.get().num_tokens()),
        },
    }


def _meta_backbone(name: str) -> Any:
    """The backbone built on the meta device: shapes only, no weights, no memory (for ``cdft show``)."""
    import torch

    from cdft_core import build_timm_backbone

    with torch.device("meta"):
        return build_timm_backbone(name, pretrained=False)


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
    register.resolver(claim, catalogue=catalogue,
                      description="a timm model (timm.list_models(pretrained=True)), or hf-hub:ORG/NAME[@REV]")
