"""``cdft embed``: one feature vector per image, for retrieval, clustering or another model.

From a trained run the features are what its head sees (the adapter's output,
``CdftModel.features``) or, with ``pooled``, the backbone's pooled output; from a bare
``--backbone NAME`` they are the backbone's pooled output. Preprocessing is the model's
own eval transform, as everywhere else.

File format (``.safetensors``, the default): one tensor ``features`` (N×D float32), row
*i* being the *i*-th readable input (an image given twice has two equal rows; it is read
and run once), and the metadata key ``cdft_embed``: JSON with ``paths`` (N paths, in row
order), ``errors`` (``{path: reason}`` of the images that could not be read, which have
no row), ``feature`` (``adapter`` or ``pooled``), ``source``
(checkpoint or backbone name) and ``data_config``. The frozen-feature cache
(:mod:`cdft_core.training.feature_store`) keeps per-split ``.npy`` parts keyed by a hash
of its inputs, for reuse inside runs; an embedding file is a self-describing
deliverable instead, so it carries its paths. ``.parquet`` (needs pyarrow) writes a
``path`` column and one ``f<j>`` column per dimension.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cdft_core.errors import UsageError
from cdft_core.inference.inputs import InputImage, distinct_images
from cdft_core.text import one_line

#: ``-o`` endings ``cdft embed`` writes (anything else would be safetensors under a misleading name)
OUTPUT_SUFFIXES = (".safetensors", ".parquet")


@dataclass
class Embeddings:
    """The readable images' paths and features (same order) and the others' reasons."""

    paths: list[str]
    features: torch.Tensor  # (N, D) float32
    errors: dict[str, str]
    feature: str
    source: str
    data_config: dict[str, Any] = field(default_factory=dict)


def backbone_model(name: str, *, pretrained: bool = True, weights: str | None = None,
                   image_size: int | None = None) -> torch.nn.Module:
    """A bare backbone (``--backbone NAME``) as a model whose ``data_config`` is its own."""
    from cdft_core.models.model import build_model

    return build_model(name, "none", 1, pretrained=pretrained, weights=weights, image_size=image_size)


def embed_images(model: torch.nn.Module, images: Sequence[InputImage], *, feature: str = "adapter", source: str = "",
                 batch_size: int = 64, num_workers: int | str = 0, precision: str = "fp32") -> Embeddings:
    """Features of every readable image (see the module docstring for ``feature``)."""
    from cdft_core.inference.batches import map_images

    if feature not in ("adapter", "pooled"):
        raise UsageError(f"feature {feature!r} is not one of adapter, pooled")
    model.eval()
    device = next(model.parameters()).device

    def features(x: torch.Tensor) -> torch.Tensor:
        return model.features(x) if feature == "adapter" else model.backbone.features(x)[1]

    distinct, slot = distinct_images(images)
    outputs, failed = map_images(distinct, model.data_config, features, device=device, batch_size=batch_size,
                                 num_workers=num_workers, precision=precision, description="embedding")
    order = [(i, k) for i, k in enumerate(slot) if k in outputs]  # input rows in order, repeats kept
    stacked = torch.stack([outputs[k] for _, k in order]) if order else torch.zeros(0, 0)
    return Embeddings([images[i].path for i, _ in order], stacked.contiguous(),
                      {distinct[k].path: reason for k, reason in sorted(failed.items())}, feature, source,
                      dict(model.data_config))


def check_embed_output(output: str) -> None:
    """A usage error before any work when ``-o`` ends in neither .safetensors nor .parquet:
    ``features.npy`` would otherwise hold safetensors bytes that numpy cannot read."""
    if not output.lower().endswith(OUTPUT_SUFFIXES):
        raise UsageError(f"-o {one_line(output, 120)!r} must end in .safetensors or .parquet (the formats cdft embed writes); "
                         f"rename it")


def embedding_bytes(embeddings: Embeddings, output: str) -> bytes:
    """The file's bytes: safetensors, or parquet when ``output`` ends in ``.parquet``."""
    if output.lower().endswith(".parquet"):
        return _parquet(embeddings)
    from safetensors.torch import save

    meta = {"paths": embeddings.paths, "errors": embeddings.errors, "feature": embeddings.feature,
            "source": embeddings.source, "data_config": embeddings.data_config}
    return save({"features": embeddings.features}, metadata={"cdft_embed": json.dumps(meta, default=str)})


def _parquet(embeddings: Embeddings) -> bytes:
    import io

    try:
        import pandas as pd
        import pyarrow  # noqa: F401
    except ImportError as exc:
        raise UsageError("a .parquet output needs pyarrow (pip install pyarrow); or write .safetensors") from exc
    frame = pd.DataFrame(embeddings.features.numpy(), columns=[f"f{j}" for j in range(embeddings.features.shape[1])])
    frame.insert(0, "path", embeddings.paths)
    out = io.BytesIO()
    frame.to_parquet(out, index=False)
    return out.getvalue()


def read_embeddings(path: str) -> tuple[list[str], torch.Tensor, dict[str, Any]]:
    """``(paths, features, metadata)`` of a ``.safetensors`` file written by ``cdft embed``."""
    import fsspec
    from safetensors.torch import load

    with fsspec.open(path, "rb") as handle:
        data = handle.read()
    header_len = int.from_bytes(data[:8], "little")  # safetensors: u64 header size, JSON header
    meta = json.loads(json.loads(data[8:8 + header_len])["__metadata__"]["cdft_embed"])
    return list(meta["paths"]), load(data)["features"], meta
