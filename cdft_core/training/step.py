"""One optimizer step over ``--accumulate N`` micro-batches of ``--batch-size`` images.

The gradients of the micro-batches add up before the one optimizer (and grad-scaler) step.
Each micro-batch's mean loss is weighted by its share of the step's images — with
``--class-weights``, its share of the step's total class weight, the denominator of a
weighted mean — so the step minimises exactly the mean loss over all of its images: batch
4 × accumulate 2 takes the step batch 8 takes (up to float rounding), and a short last step
is still the mean over the images it has. With one micro-batch the share is exactly 1 and
the step is the plain one, bit for bit.

Under DDP the micro-batches before the last run inside ``model.no_sync()``: the gradients
are all-reduced once per step, as DDP's own documentation describes accumulation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from cdft_core.training.evaluation import autocast
from cdft_core.training.speed import to_device

Batch = TypeVar("Batch")


def step_batches(batches: Iterable[Batch], accumulate: int) -> Iterator[list[Batch]]:
    """The micro-batches of each optimizer step: ``accumulate`` consecutive batches, the last step
    what is left."""
    group: list[Batch] = []
    for batch in batches:
        group.append(batch)
        if len(group) == accumulate:
            yield group
            group = []
    if group:
        yield group


def loss_shares(labels: Sequence[torch.Tensor], weights: torch.Tensor | None) -> list[float]:
    """Each micro-batch's share of its step's loss denominator: its images over the step's, or,
    with class weights, the sum of its images' weights over the step's (exactly 1.0 for one)."""
    sizes = [float(weights[batch].sum()) if weights is not None else float(batch.numel()) for batch in labels]
    total = sum(sizes)
    return [size / total for size in sizes]


@dataclass
class StepResult:
    """What one optimizer step saw, for the epoch's running sums and the log."""

    loss: float  # the loss the step minimised (the weighted mean over its images)
    loss_sum: float  # sum over its micro-batches of mean loss × images (the epoch's train loss sums these)
    correct: int
    count: int


def backward_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Sequence[tuple[Any, torch.Tensor]],
                  *, device: torch.device, channels_last: bool, precision: str, scaler: torch.amp.GradScaler | None,
                  class_weights: torch.Tensor | None) -> StepResult:
    """Zero the gradients, then forward and backward every micro-batch of one step (``model``
    may be the DDP wrapper); :func:`optimizer_step` applies them."""
    optimizer.zero_grad(set_to_none=True)
    shares = loss_shares([labels for _, labels in batches], class_weights)
    weights = class_weights.to(device) if class_weights is not None else None
    step_loss, loss_sum, correct, count = 0.0, 0.0, 0, 0
    for position, ((inputs, labels), share) in enumerate(zip(batches, shares, strict=True)):
        inputs = to_device(inputs, device, channels_last)
        labels = labels.to(device, non_blocking=True)
        last = position == len(batches) - 1
        with model.no_sync() if not last and hasattr(model, "no_sync") else contextlib.nullcontext():
            with autocast(precision, device):
                logits = model(inputs)
            loss = F.cross_entropy(logits.float(), labels, weight=weights)
            scaled = loss if share == 1.0 else loss * share
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        value = loss.item()
        step_loss += value * share
        loss_sum += value * labels.shape[0]
        correct += int((logits.detach().argmax(1) == labels).sum())
        count += int(labels.shape[0])
    return StepResult(step_loss, loss_sum, correct, count)


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """The step of the accumulated gradients: once per step, through the grad scaler under fp16."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()

