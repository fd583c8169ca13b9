"""Built-in plugin: curated pathology foundation models (UNI, UNI2-h, Virchow2, H-optimus, Prov-GigaPath).

Each row is a timm ViT built with the creation arguments of its Hugging Face model card
(``cdft_core.FOUNDATION_MODELS``); weights come from the gated or public hub repo, the
local Hugging Face cache, or ``--weights PATH``, and are loaded strictly. Listing them
imports neither torch nor timm. ``hf-hub:<repo>`` of a row (``hf-hub:MahmoodLab/UNI``) resolves to
the row. See docs/models.md#pathology-foundation-models.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from cdft_core import FOUNDATION_MODELS, Lazy, foundation_data_config, hookimpl


def build(name: str, **options: Any) -> Any:
    """``build(name, pretrained=..., weights=..., image_size=..., grad_checkpointing=...)``."""
    from cdft_core import build_foundation_backbone

    return build_foundation_backbone(name, **options)


def metadata(name: str) -> dict[str, Any]:
    row = FOUNDATION_MODELS[name]
    return {
        "family": "vit",
        "pretraining": f"pathology foundation model ({row.hub})",
        "source": row.card,
        "licence": row.licence + (" (gated: accept on the card, set HF_TOKEN)" if row.gated else ""),
        "data_config": Lazy(partial(foundation_data_config, name)),
    }


def claim(name: str) -> dict[str, Any] | None:
    """``hf-hub:<a row's repo>`` (no revision) is that row: its creation arguments win over the repo's config.json."""
    if not name.startswith("hf-hub:") or "@" in name:
        return None
    repo = name[len("hf-hub:"):].lower()
    row = next((n for n, r in FOUNDATION_MODELS.items() if r.hub.lower() == repo), None)
    if row is None:
        return None
    return {"name": row, "factory": partial(build, row), "description": FOUNDATION_MODELS[row].description,
            "metadata": metadata(row)}


@hookimpl
def register_backbones(register):
    for name, row in FOUNDATION_MODELS.items():
        register(name, partial(build, name), description=row.description, metadata=metadata(name))
    register.resolver(claim, description="hf-hub:ORG/NAME of a curated row's repo (e.g. hf-hub:MahmoodLab/UNI)")
