"""The data a run iterates over: seeded augmentation, image order, loaders.

Every random choice here is a function of the run's seed, the epoch and the image, never
of the number of processes or loader workers: that is what makes 1 and N processes, and
an interrupted and an uninterrupted run, see the same images.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from cdft_core.cpus import available_cpus
from cdft_core.training.balance import balanced_draw
from cdft_core.training.schedule import derive_seed
from cdft_core.training.speed import loader_kwargs


class SeededAugmentation(Dataset):
    """Train-time images whose random augmentation depends only on (seed, epoch, index).

    Each item is drawn under a forked RNG seeded from those three numbers, so a run
    resumed in the middle of an epoch sees exactly the images it would have seen. A key
    is an index (the epoch is :attr:`epoch`) or an ``(epoch, index)`` pair: the training
    loader sends pairs, because its persistent workers hold copies of this dataset made
    when they started and never see a later :attr:`epoch`.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only (the augmentation's): torch.manual_seed would also reseed
            # CUDA's generators, which fork_rng(devices=[]) does not restore, and costs ~30x more
            torch.random.default_generator.manual_seed(derive_seed(self.seed, "augment", int(epoch), int(index)))
            return self.dataset[int(index)]


class WithIndex(Dataset):
    """``(image, label, index)``: evaluation keeps track of which image each prediction is for."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image, label = self.dataset[index]
        return image, label, index


def train_order(dataset: Dataset, *, seed: int, epoch: int, rank: int, world_size: int,
                max_images: int | None = None, sampler: str = "random",
                labels: Sequence[int] | None = None) -> list[int]:
    """This rank's image order for an epoch: a function of (seed, epoch, rank, world size).

    ``sampler="random"``: ``DistributedSampler``'s seeded shuffle. ``"balanced"``: the
    class-balanced draw with replacement of :func:`cdft_core.training.balance.balanced_draw`
    (needs each image's ``labels``), shared out exactly as the shuffle is (:func:`shard`).
    """
    if sampler == "balanced":
        if labels is None or len(labels) != len(dataset):
            raise ValueError("the balanced sampler needs the label of every training image")
        indices = shard(balanced_draw(labels, seed=seed, epoch=epoch), rank, world_size)
    else:
        distributed = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                         drop_last=False)
        distributed.set_epoch(epoch)
        indices = list(distributed)
    return indices[:max_images] if max_images else indices


def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s share of an epoch's ``indices``, as ``DistributedSampler`` shares its
    shuffle: padded with the first indices to a multiple of ``world_size``, then every
    ``world_size``-th from position ``rank`` (the shares partition the padded list)."""
    items = list(indices)
    total = math.ceil(len(items) / world_size) * world_size
    while len(items) < total:
        items += items[: total - len(items)]
    return items[rank:total:world_size]


def steps_per_epoch(images: int, world_size: int, batch_size: int, max_steps: int | None, accumulate: int = 1) -> int:
    """Optimizer steps of an epoch: ``accumulate`` batches of ``batch_size`` each (the last may be short)."""
    steps = math.ceil(math.ceil(math.ceil(images / world_size) / batch_size) / accumulate)
    return min(steps, max_steps) if max_steps else steps


#: ``auto`` never starts more loader workers per process than this
MAX_AUTO_WORKERS = 8


def local_processes() -> int:
    """Training processes on this machine: torchrun's ``LOCAL_WORLD_SIZE``, else 1."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def resolve_num_workers(requested: int | str, cpus: int | None = None, processes: int | None = None) -> int:
    """Loader workers per process: an explicit count as given; ``auto``: this process's share
    of the CPUs (``cpus`` / ``processes``, read from the machine when not given), at most
    :data:`MAX_AUTO_WORKERS`, and 0 (load in the training process) when the share is one CPU
    or less — a worker there would only compete with training for it."""
    if requested != "auto":
        return int(requested)
    share = (cpus or available_cpus()) // (processes or local_processes())
    return 0 if share <= 1 else min(share, MAX_AUTO_WORKERS)


def describe_num_workers(requested: int | str) -> str:
    """The log's words for it: ``2 loader workers per process (auto: 2 CPUs, 1 process)``."""
    workers = resolve_num_workers(requested)
    text = f"{workers} loader worker{'s' if workers != 1 else ''} per process"
    if requested == "auto":
        cpus, processes = available_cpus(), local_processes()
        text += f" (auto: {cpus} CPU{'s' if cpus != 1 else ''}, {processes} process{'es' if processes != 1 else ''})"
    return text


def make_loader(dataset: Dataset, indices: Iterable[Any], batch_size: int, workers: int | str, seed: int,
                *, device: torch.device | str | None = None, persistent: bool = False) -> DataLoader:
    """A loader over ``indices`` in that order; ``workers`` may be ``auto`` (:func:`resolve_num_workers`).

    ``device``: where the batches go (pinned memory for CUDA; None: pinned when CUDA is
    available). ``persistent``: the loader is iterated again for every epoch, so its workers
    are kept (:func:`cdft_core.training.speed.loader_kwargs`).
    """
    count = resolve_num_workers(workers)
    # the explicit generator keeps the loader from drawing on the global RNG (dropout's stream)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=indices, num_workers=count,
        generator=torch.Generator().manual_seed(seed), **loader_kwargs(device, count, persistent),
    )


class EpochKeys(Sampler):
    """The keys of the epoch in progress, replaced before each epoch; a reused loader reads
    them afresh each time it is iterated (the sampler lives in the training process)."""

    def __init__(self) -> None:
        self.keys: list[Any] = []

    def __iter__(self) -> Iterator[Any]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


class RunLoaders:
    """A run's loaders, built once and iterated for every epoch so their workers persist.

    Worker processes are started at a loader's first epoch and kept (with their prefetched
    batches) until :meth:`close`. Nothing a worker remembers reaches a batch: the training
    keys carry their epoch (:class:`SeededAugmentation`), evaluation has no randomness.
    """

    def __init__(self) -> None:
        self._loaders: dict[str, DataLoader] = {}

    def train(self, dataset: SeededAugmentation, indices: list[int], epoch: int, batch_size: int,
              workers: int | str, seed: int, device: torch.device | str | None = None) -> DataLoader:
        """The training loader, set to yield ``indices`` (in order) with ``epoch``'s augmentation."""
        loader = self._loaders.get("train")
        if loader is None:
            loader = make_loader(dataset, EpochKeys(), batch_size, workers, seed, device=device, persistent=True)
            self._loaders["train"] = loader
        loader.sampler.keys = [(epoch, index) for index in indices]
        return loader

    def get(self, name: str, build: Callable[[], DataLoader]) -> DataLoader:
        """The loader called ``name``, built by ``build()`` the first time (evaluation's)."""
        if name not in self._loaders:
            self._loaders[name] = build()
        return self._loaders[name]

    def close(self) -> None:
        """Let the workers go: dropping the last reference to a loader shuts its workers down."""
        self._loaders.clear()
