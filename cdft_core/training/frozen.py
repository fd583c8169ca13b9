"""Frozen stages: the backbone's outputs computed once per stage, from the feature cache.

While a stage's backbone is frozen (``model.backbone_frozen``: eval mode, no gradients —
``linear``, ``frt``, stage 1 of ``staged``, any plugin strategy that labels every backbone
parameter frozen), what it returns for an image does not change during the stage. So:

- **Validation and test** (exact, on by default; ``--no-feature-cache`` turns it off):
  each rank computes its share of each split once, in exactly the batches
  :func:`~cdft_core.training.evaluation.evaluate` would use (its sampler, batch size and
  order, the same autocast), and stores the outputs in the dtype the backbone returned
  them. Every evaluation of the stage then feeds the stored tensors to adapter and head:
  they see bit-identical inputs, so the metrics are those of evaluating the images.
- **Training** (``--train-views N``, opt-in): N augmented views of every training image
  are computed once; view *v* of image *i* is the image epoch *v* of an uncached run
  draws (:class:`~cdft_core.training.loaders.SeededAugmentation` at epoch *v*: a function
  of the seed, *i* and *v*), and epoch *e* trains on view *e* mod N. From epoch N on, the
  augmentations repeat: an approximation of the paper's recipe (fresh ones every
  epoch), reported in ``config.yaml`` and ``summary.json``. Without ``--train-views``
  every epoch runs the backbone on freshly augmented images, as before.
- What is stored follows the adapter: the pooled features for an adapter registered with
  ``uses_tokens: False`` (``none``), the tokens and pooled features otherwise (CDTM).

The key (:mod:`cdft_core.training.feature_store`) holds the backbone, a SHA-256 of its
weights and buffers (a changed weight file, or weights a previous stage trained, give a
new cache), a SHA-256 of the source of its classes (:func:`code_digest`), the data config, the image-cache key of the run's images (paths and file
fingerprints), the split's ordered paths, the precision and device, and per store either
the evaluation shard (rank, world size, batch size) or the views, the seed and ``--augment``.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cdft_core.models.model import Features
from cdft_core.training.evaluation import autocast, eval_batch_size, eval_loader
from cdft_core.training.feature_store import FeatureStore, open_store
from cdft_core.training.loaders import make_loader
from cdft_core.training.log import progress_bar

if TYPE_CHECKING:
    from torch.utils.data import DataLoader, Dataset

    from cdft_core.models.model import CdftModel
    from cdft_core.training.distributed import DistInfo
    from cdft_core.training.state import Run


@dataclass
class FeatureSource:
    """A frozen model and what every store computed from it shares: the key's common inputs."""

    model: CdftModel
    parts: tuple[str, ...]
    precision: str
    dist: DistInfo
    key: dict[str, Any]
    root: str
    cache_dir: str | None = None
    log: Callable[[str], None] | None = None

    @classmethod
    def of(cls, model: CdftModel, adapter: str, *, images_key: str, root: str, precision: str, dist: DistInfo,
           cache_dir: str | None = None, log: Callable[[str], None] | None = None) -> FeatureSource:
        """The source of a model whose backbone is frozen now (its weights are hashed here)."""
        import timm

        from cdft_core import __version__

        if not model.backbone_frozen:
            raise ValueError("the feature cache needs a frozen backbone (apply a stage that freezes it first)")
        parts = feature_parts(adapter)
        device = torch.device(dist.device)
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        key = {"backbone": model.spec["backbone"], "image_size": model.spec["image_size"],
               "data_config": {k: v for k, v in model.data_config.items() if k != "source"},
               "weights": weight_digest(model.backbone), "code": code_digest(model.backbone),
               "images": images_key, "parts": list(parts),
               "precision": precision, "device": where,
               "versions": {"cdft": __version__, "torch": torch.__version__, "timm": timm.__version__}}
        return cls(model, parts, precision, dist, key, root, cache_dir, log)

    def batches(self, loader: DataLoader, description: str) -> Iterator[Features]:
        """The backbone's outputs for each batch of images, as a frozen model computes them in
        :func:`~cdft_core.training.evaluation.evaluate` (same device copy, autocast, no grad):
        keep the two in step, or the stored features stop being bit-identical."""
        device = self.dist.device
        bar = progress_bar(self.dist.is_main, len(loader), 0, description, unit="batch")
        try:
            for batch in loader:
                with torch.no_grad(), autocast(self.precision, device):  # left before yielding: no state leaks out
                    tokens, pooled = self.model.backbone.features(batch[0].to(device, non_blocking=True))
                yield Features(tokens if "tokens" in self.parts else None, pooled if "pooled" in self.parts else None)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()


def feature_parts(adapter: str) -> tuple[str, ...]:
    """What a store keeps for this adapter: the pooled features only when its registration
    says it reads no tokens (``uses_tokens: False``), else tokens and pooled features."""
    from cdft_core.registry import get_registry

    uses_tokens = get_registry().get("adapter", adapter).metadata.get("uses_tokens", True)
    return ("pooled",) if uses_tokens is False else ("tokens", "pooled")


def weight_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes, bytes): its weights, whatever file they came from."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        values = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}\t{values.dtype}\t{tuple(tensor.shape)}\n".encode())
        digest.update(values.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def code_digest(module: torch.nn.Module) -> str:
    """SHA-256 of the source files that define ``module``'s classes and their bases (torch's
    aside: its version is in the key).

    The same weights through edited code are other features: a plugin backbone changed in
    place (an editable install, no new version) or cdft's own wrapper must not reuse a store
    its old code wrote. Only the classes' own modules are read, not helpers they import.
    """
    names = sorted({cls.__module__ for sub in module.modules() for cls in type(sub).__mro__
                    if cls.__module__ != "builtins" and cls.__module__.split(".")[0] != "torch"})
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}\n".encode())
        path = getattr(sys.modules.get(name), "__file__", None)
        with contextlib.suppress(OSError):  # a module without a readable file (zipped): its name still counts
            digest.update(Path(path).read_bytes() if path else b"")
    return digest.hexdigest()


def paths_digest(paths: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()


# -- evaluation splits: each rank's share, in evaluate's batches ----------------------------
class StoredEval:
    """A rank's share of an evaluation split from the cache, iterated as
    :func:`~cdft_core.training.evaluation.evaluate` iterates its loader: ``(features,
    labels, indices)`` in the same batches."""

    def __init__(self, store: FeatureStore, indices: Sequence[int], labels: Sequence[int], batch_size: int) -> None:
        if store.rows != len(indices):
            raise ValueError(f"the feature cache {store.directory} has {store.rows} rows, this share {len(indices)}")
        self.store = store
        self.indices = torch.as_tensor(list(indices), dtype=torch.long)
        self.labels = torch.as_tensor([labels[i] for i in indices], dtype=torch.long)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Features, torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.indices), self.batch_size):
            rows = slice(start, start + self.batch_size)
            yield self.store.take(rows), self.labels[rows], self.indices[rows]


def eval_features(source: FeatureSource, split: str, dataset: Dataset, paths: Sequence[str], batch_size: int,
                  num_workers: int | str) -> StoredEval:
    """This rank's share of an evaluation split (``dataset``: its images as evaluation sees
    them), from the cache or computed now in :func:`eval_loader`'s batches."""
    loader = eval_loader(dataset, source.dist, batch_size, num_workers)
    indices = list(loader.sampler)
    dist = source.dist
    inputs = {**source.key, "split": split, "paths": paths_digest(paths), "transform": "eval",
              "shard": [dist.rank, dist.world_size], "batch_size": batch_size}
    share = f" (rank {dist.rank}'s share)" if dist.world_size > 1 else ""
    store = open_store(inputs, lambda: source.batches(loader, f"feature cache {split}"), rows=len(indices),
                       contents=f"{source.key['backbone']} {split}{share}, {len(indices)} images",
                       root=source.root, cache_dir=source.cache_dir, log=source.log)
    return StoredEval(store, indices, dataset.labels, batch_size)


# -- training: N augmented views per image --------------------------------------------------
@dataclass
class TrainViews:
    """N stored augmented views of every training image; epoch *e* reads view *e* mod N."""

    store: FeatureStore
    views: int
    labels: torch.Tensor

    def batches(self, indices: Sequence[int], batch_size: int, epoch: int) -> Iterator[tuple[Features, torch.Tensor]]:
        """``(features, labels)`` of ``indices`` (this rank's order of the epoch) in batches."""
        count, view = len(self.labels), epoch % self.views
        for start in range(0, len(indices), batch_size):
            chunk = list(indices[start:start + batch_size])
            yield self.store.take([view * count + i for i in chunk]), self.labels[chunk]


def view_features(source: FeatureSource, dataset: Dataset, paths: Sequence[str], *, views: int, seed: int,
                  batch_size: int, num_workers: int | str, augment: str = "paper") -> TrainViews:
    """The ``views`` augmented views of every image of ``dataset`` (a
    :class:`~cdft_core.training.loaders.SeededAugmentation` whose pipeline ``--augment``
    named: part of the key), from the cache or computed now by this process (others
    asking for the same views wait for it)."""
    count = len(dataset)
    keys = [(view, index) for view in range(views) for index in range(count)]
    loader = make_loader(dataset, keys, batch_size, num_workers, 0, device=source.dist.device)
    transform = "augment" if augment == "paper" else f"augment:{augment}"  # the paper's keeps its earlier key
    inputs = {**source.key, "split": "train", "paths": paths_digest(paths), "transform": transform,
              "views": views, "seed": seed}
    store = open_store(inputs, lambda: source.batches(loader, "feature cache train views"), rows=len(keys),
                       contents=f"{source.key['backbone']} train, {count} images x {views} augmented views",
                       root=source.root, cache_dir=source.cache_dir, log=source.log)
    return TrainViews(store, views, torch.as_tensor(dataset.dataset.labels, dtype=torch.long))


# -- a stage of `cdft run` ------------------------------------------------------------------
@dataclass
class FrozenFeatures:
    """What a frozen stage reads from the cache: its evaluation splits, and its training
    views when ``--train-views`` asks for them."""

    evaluation: dict[str, StoredEval] = field(default_factory=dict)
    train: TrainViews | None = None

    def eval_loader(self, split: str) -> StoredEval | None:
        return self.evaluation.get(split)

    def close(self) -> None:
        for stored in self.evaluation.values():
            stored.store.close()
        if self.train is not None:
            self.train.store.close()


def stage_features(run: Run, index: int) -> FrozenFeatures | None:
    """The cached features of stage ``index`` when its backbone is frozen (call after
    :func:`~cdft_core.strategy.apply_stage`), else None: the stage runs the backbone."""
    from cdft_core.data.image_cache import tables_key

    config, model, splits = run.config, run.model, run.splits
    if not config.feature_cache:
        return None
    if not model.backbone_frozen:
        if config.train_views:
            run.log(f"stage {index + 1} trains the backbone: --train-views does not apply to it")
        return None
    cache = getattr(run.data.val, "cache", None)
    images_key = cache.key if cache is not None else tables_key(
        splits.root, [splits.train, splits.val, splits.test], model.data_config)
    source = FeatureSource.of(model, run.adapter, images_key=images_key, root=splits.root, precision=run.precision,
                              dist=run.dist, cache_dir=config.cache_dir, log=run.log)
    batch = eval_batch_size(config)
    features = FrozenFeatures()
    try:
        for split in ("val", "test"):
            paths = getattr(splits, split)["image_path"].tolist()
            features.evaluation[split] = eval_features(source, split, getattr(run.data, split), paths, batch,
                                                       config.num_workers)
        if config.train_views:
            views = 1 if config.augment == "none" else config.train_views  # no augmentation: every view is the same
            features.train = view_features(source, run.data.train, splits.train["image_path"].tolist(),
                                           views=views, seed=config.seed, batch_size=batch,
                                           num_workers=config.num_workers, augment=config.augment)
            run.log(f"stage {index + 1}: every epoch trains on the stored features of the resized images (--augment "
                    f"none: one view, the images an uncached epoch would use)" if views == 1 and config.augment == "none"
                    else f"stage {index + 1}: epoch e trains on stored augmented view e mod {views} of each image "
                         f"(--train-views: an approximation of fresh augmentation every epoch)")
    except BaseException:
        features.close()
        raise
    return features
