"""The data a run iterates over: seeded augmentation, image order, loaders.

Every random choice here is a function of the run's seed, the epoch and the image, never
of the number of processes or loader workers: that is what makes 1 and N processes, and
an interrupted and an uninterrupted run, see the same images.
"""

from __future__ import annotations

import math
import os

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cdft_core.training.schedule import derive_seed


class SeededAugmentation(Dataset):
    """Train-time images whose random augmentation depends only on (seed, epoch, index).

    Each item is drawn under a forked RNG seeded from those three numbers, so a run
    resumed in the middle of an epoch sees exactly the images it would have seen.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, "augment", self.epoch, int(index)))
            return self.dataset[index]


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
                max_images: int | None = None) -> list[int]:
    """This rank's image order for an epoch: a function of (seed, epoch, rank, world size)."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    return indices[:max_images] if max_images else indices


def steps_per_epoch(images: int, world_size: int, batch_size: int, max_steps: int | None) -> int:
    steps = math.ceil(math.ceil(images / world_size) / batch_size)
    return min(steps, max_steps) if max_steps else steps


#: ``auto`` never starts more loader workers per process than this
MAX_AUTO_WORKERS = 8


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, cgroup cpusets), else the CPU count."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


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


def make_loader(dataset: Dataset, indices: list[int], batch_size: int, workers: int | str, seed: int) -> DataLoader:
    """A loader over ``indices`` in that order; ``workers`` may be ``auto`` (:func:`resolve_num_workers`)."""
    # the explicit generator keeps the loader from drawing on the global RNG (dropout's stream)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=indices, num_workers=resolve_num_workers(workers),
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed), persistent_workers=False,
    )
