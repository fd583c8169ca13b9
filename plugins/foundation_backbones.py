"""Built-in plugin: curated pathology foundation models (UNI, UNI2-h, Virchow2, H-optimus, Prov-GigaPath).

Each row is a timm ViT built with the creation arguments of its Hugging Face model card
(``cdft_core.FOUNDATION_MODELS``); weights come from the gated or public hub repo, the
local Hugging Face cache, or ``--weights PATH``, and are loaded strictly. Listing them
imports neither torch nor timm. See docs/models.md#pathology-foundation-models.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from cdft_core import FOUNDATION_MODELS, Lazy, foundation_data_config, hookimpl


def build(name: str, **options: Any) -> Any:
    """``build(name, pretrained=..., weights=..., image_size=..., grad_checkpointing=...)``."""
    from cdft_core import build_foundation_backbone

    return build_foundation_backbone(name, **options)


@hookimpl
def register_backbones(register):
    for name, row in FOUNDATION_MODELS.items():
        register(
            name,
            partial(build, name),
            description=row.description,
            metadata={
                "family": "vit",
                "pretraining": f"pathology foundation model ({row.hub})",
                "source": row.card,
                "licence": row.licence + (" (gated: accept on the card, set HF_TOKEN)" if row.gated else ""),
                "data_config": Lazy(partial(foundation_data_config, name)),
            },
        )
