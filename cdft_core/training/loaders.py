"""The data a run iterates over: seeded augmentation, image order, loaders.

Every random choice here is a function of the run's seed, the epoch and the image, never
of the number of processes or loader workers: that is what makes 1 and N processes, and
an interrupted and an uninterrupted run, see the same images.
"""

from __future__ import annotations

import math

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


def make_loader(dataset: Dataset, indices: list[int], batch_size: int, workers: int, seed: int) -> DataLoader:
    # the explicit generator keeps the loader from drawing on the global RNG (dropout's stream)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=indices, num_workers=workers, pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed), persistent_workers=False,
    )
