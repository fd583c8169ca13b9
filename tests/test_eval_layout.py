"""`cdft eval` in one process lays its batches out as the run's processes did.

A batch's images are computed together, and a convolution or matrix product may round
differently for another batch make-up: a 2-process ResNet run's validation loss differed
from `cdft eval`'s in the 8th digit (10 + 10 images per rank against 16 + 4). The model
below makes the batch make-up visible: each logit carries its batch's size.
"""

from __future__ import annotations

import torch

from cdft_core.training.distributed import DistInfo
from cdft_core.training.evaluation import _recorded_processes, predict


class _Images(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 11

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.full((2,), float(index)), index % 2


class _BatchSizeModel(torch.nn.Module):
    """logits = (image value, size of the batch it was computed in)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[:, 0], torch.full((len(x),), float(len(x)))], 1)


def _batch_sizes(layout: int, batch_size: int) -> list[int]:
    one = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    result = predict(_BatchSizeModel(), _Images(), ["a", "b"], one, batch_size, 0, "fp32", layout=layout)
    assert result.logits[:, 0].tolist() == [float(i) for i in range(11)]  # every image once, in order
    return [int(v) for v in result.logits[:, 1].tolist()]


def test_one_process_evaluates_in_its_own_batches():
    assert _batch_sizes(1, 4) == [4] * 8 + [3] * 3


def test_a_two_process_run_s_batches_are_rebuilt_rank_by_rank():
    # DistributedSampler, 11 images on 2 ranks: rank 0 gets 0,2,..,10 and rank 1 gets 1,3,..,9 and
    # a padding repeat of 0; with batch 4 each rank evaluates 4 + 2 images
    assert _batch_sizes(2, 4) == [4, 4, 4, 4, 4, 4, 4, 4, 2, 2, 2]
    # three ranks of 4 (one padded): one batch each
    assert _batch_sizes(3, 4) == [4] * 11


def test_the_layout_comes_from_the_checkpoint_and_defaults_to_one():
    assert _recorded_processes({"cdft_world_size": 2}) == 2
    assert _recorded_processes({}) == 1  # older checkpoints, probes
    assert _recorded_processes({"cdft_world_size": "2"}) == 1 and _recorded_processes({"cdft_world_size": 0}) == 1
