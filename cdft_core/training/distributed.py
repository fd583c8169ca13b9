"""The process group, and the gathering that makes metrics independent of the process count.

A process started by torchrun (``cdft run --nproc-per-node N`` or an external
``torchrun -m cdft_cli run ...``) finds ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in its
environment and joins a process group: gloo on CPU, nccl on CUDA, with a timeout on
every collective so a lost peer ends the job instead of hanging it. Without those
variables the run is a plain single process and every helper here is a no-op.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from cdft_core.errors import CdftError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether this process is a torchrun worker (the launcher sets these variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_distributed(device: str, timeout_s: float) -> DistInfo:
    """Join the process group when launched by torchrun; pick this process's device.

    ``device`` is ``cpu`` or ``cuda`` (already resolved). On CUDA each process uses the
    GPU of its local rank.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1
    rank = int(os.environ.get("RANK", "0")) if world_size > 1 else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world_size > 1 else 0
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise CdftError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                f"lower --nproc-per-node to the number of GPUs"
            )
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
        if device == "cuda":
            kwargs["device_id"] = torch_device
        dist.init_process_group(**kwargs)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def teardown() -> None:
    """Leave the process group (explicitly, so no rank exits while others still talk to it)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (in-memory pickling between our own processes)."""
    if not info.distributed:
        return obj
    box = [obj if info.rank == src else None]
    dist.broadcast_object_list(box, src=src, device=info.device if info.device.type == "cuda" else None)
    return box[0]


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a stop request)."""
    if not info.distributed:
        return flag
    value = torch.tensor([1 if flag else 0], device=info.device, dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def mean_over_ranks(total: float, count: int, info: DistInfo) -> float:
    """The mean of per-sample values summed on each rank (``total``) over ``count`` samples."""
    if not info.distributed:
        return total / max(count, 1)
    value = torch.tensor([total, float(count)], device=info.device, dtype=torch.float64)
    dist.all_reduce(value)
    return float(value[0] / value[1].clamp(min=1))


def gather_predictions(
    indices: torch.Tensor, labels: torch.Tensor, outputs: torch.Tensor, info: DistInfo, dataset_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's predictions, once each, in dataset order.

    ``indices`` (n,) are dataset positions, ``labels`` (n,), ``outputs`` (n, k), with ``n``
    free to differ between ranks. A ``DistributedSampler`` pads the evaluation set by
    repeating samples so every rank gets as many; those repeats are dropped here, so
    the result covers exactly the ``dataset_size`` samples — the same with 1 or N
    processes. Returns CPU tensors on every rank.
    """
    if info.distributed:
        device = info.device
        n = torch.tensor([indices.numel()], device=device, dtype=torch.int64)
        sizes = [torch.zeros_like(n) for _ in range(info.world_size)]
        dist.all_gather(sizes, n)
        longest = int(max(s.item() for s in sizes))
        k = outputs.shape[1]

        def padded(t: torch.Tensor, width: int | None) -> torch.Tensor:
            shape = (longest,) if width is None else (longest, width)
            buf = torch.zeros(shape, dtype=t.dtype, device=device)
            buf[: t.shape[0]] = t.to(device)
            return buf

        parts = []
        for t, width in ((indices.long(), None), (labels.long(), None), (outputs.float(), k)):
            local = padded(t, width)
            bufs = [torch.empty_like(local) for _ in range(info.world_size)]
            dist.all_gather(bufs, local)
            parts.append(torch.cat([b[: int(s.item())] for b, s in zip(bufs, sizes, strict=True)]).cpu())
        indices, labels, outputs = parts
    indices, labels, outputs = indices.cpu().long(), labels.cpu().long(), outputs.cpu().float()
    order = torch.argsort(indices, stable=True)
    indices, labels, outputs = indices[order], labels[order], outputs[order]
    keep = torch.ones_like(indices, dtype=torch.bool)
    keep[1:] = indices[1:] != indices[:-1]
    indices, labels, outputs = indices[keep], labels[keep], outputs[keep]
    if indices.numel() != dataset_size or (dataset_size and int(indices[-1]) != dataset_size - 1):
        raise CdftError(
            f"evaluation gathered {indices.numel()} distinct samples for a set of {dataset_size}; "
            f"this is a bug in the evaluation sampler"
        )
    return indices, labels, outputs


def wrap_ddp(model: torch.nn.Module, info: DistInfo, probe: torch.Tensor, precision: str,
             log: Callable[[str], None]) -> torch.nn.Module:
    """A fresh DDP wrapper for a stage (it sees only the parameters that train now); the model itself when not distributed.

    ``probe``: a batch of 2 images for :func:`unused_parameters`.
    """
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    unused = unused_parameters(model, probe.to(info.device), precision)
    if unused:
        log(f"{len(unused)} trainable parameters get no gradient (e.g. {unused[0]}); DDP will look for unused parameters")
    device_ids = [info.local_rank] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=bool(unused))


def unused_parameters(model: torch.nn.Module, images: torch.Tensor, precision: str) -> list[str]:
    """Trainable parameters that one forward/backward pass leaves without a gradient.

    The probe runs in eval mode, so it updates no normalisation statistics.
    """
    from cdft_core.training.evaluation import autocast

    was_training = model.training
    model.eval()
    with autocast(precision, images.device):
        model(images).float().sum().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for p in model.parameters():
        p.grad = None
    model.train(was_training)
    return unused


def broadcast_buffers(model: torch.nn.Module, info: DistInfo) -> None:
    """Every rank takes rank 0's buffers (BatchNorm running statistics).

    DDP broadcasts buffers only at the start of the next forward, so after an epoch each
    rank's statistics come from its own batches; evaluating then would score N different
    models. Called before every evaluation and save, it makes the model each rank
    evaluates exactly the model rank 0 saves.
    """
    if not info.distributed:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
