"""One optimizer step over ``--accumulate N`` micro-batches of ``--batch-size`` images.

The gradients of the micro-batches add up before the one optimizer (and grad-scaler) step.
Each micro-batch's mean loss is weighted by its share of the step's images, so the step
minimises exactly the mean loss over all of its images: batch 4 × accumulate 2 takes the
step batch 8 takes (up to float rounding), and a short last step is still the mean over the
images it has. With one micro-batch the share is exactly 1 and the step is the plain one,
bit for bit. BatchNorm layers in train mode are the exception: each micro-batch is
normalised by its own statistics (the stage's log line says so, see
:meth:`~cdft_core.models.model.CdftModel.training_batchnorms`).

With ``--class-weights`` an image's loss is its cross-entropy times its class's weight, and
the step takes the plain mean of those over its images (:func:`image_loss`) — not
PyTorch's weighted mean, which divides by the batch's sum of weights. The plain mean is an
unbiased estimate of the class-balanced loss, (1/K)·Σ_c (mean loss of class c), whatever
classes a batch happens to hold; the weighted mean depends on each batch's mix and ignores
the weights altogether for a batch of one class (batch size 1, or one class per rank).

Under DDP the micro-batches before the last run inside ``model.no_sync()``: the gradients
are all-reduced once per step, as DDP's own documentation describes accumulation. Every
rank's share of a step has the same number of images (the sampler pads), so DDP's average
of the ranks' means is the mean over the step's images on all ranks, weights included.
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


def loss_shares(labels: Sequence[torch.Tensor]) -> list[float]:
    """Each micro-batch's share of its step's images (exactly 1.0 for one micro-batch)."""
    sizes = [float(batch.numel()) for batch in labels]
    total = sum(sizes)
    return [size / total for size in sizes]


def image_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The mean over the batch of each image's cross-entropy, times its class weight when given."""
    if weights is None:
        return F.cross_entropy(logits, labels)
    return (F.cross_entropy(logits, labels, reduction="none") * weights[labels]).mean()


@dataclass
class StepResult:
    """What one optimizer step saw, for the epoch's running sums and the log."""

    loss: float  # the loss the step minimised (the mean over its images, class weights applied)
    loss_sum: float  # sum over its micro-batches of mean loss × images (the epoch's train loss sums these)
    correct: int
    count: int


def backward_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Sequence[tuple[Any, torch.Tensor]],
                  *, device: torch.device, channels_last: bool, precision: str, scaler: torch.amp.GradScaler | None,
                  class_weights: torch.Tensor | None) -> StepResult:
    """Zero the gradients, then forward and backward every micro-batch of one step (``model``
    may be the DDP wrapper); :func:`optimizer_step` applies them."""
    optimizer.zero_grad(set_to_none=True)
    shares = loss_shares([labels for _, labels in batches])
    weights = class_weights.to(device) if class_weights is not None else None
    step_loss, loss_sum, correct, count = 0.0, 0.0, 0, 0
    for position, ((inputs, labels), share) in enumerate(zip(batches, shares, strict=True)):
        inputs = to_device(inputs, device, channels_last)
        labels = labels.to(device, non_blocking=True)
        last = position == len(batches) - 1
        with model.no_sync() if not last and hasattr(model, "no_sync") else contextlib.nullcontext():
            with autocast(precision, device):
                logits = model(inputs)
            loss = image_loss(logits.float(), labels, weights)
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



def warn_ungraded(optimizer: torch.optim.Optimizer, log: Any, stage_index: int) -> list[str]:
    """Log (once, after a stage's first backward) the trainable parameters no gradient reached.

    They are labelled trainable but take no part in the loss: harmless for a layer the
    adapter does not read (a ConvNeXt's head norm under the CDTM, which reads the tokens), a
    silent failure for a plugin's parameter outside ``backbone.`` that should change the
    backbone's output while every backbone parameter is frozen
    (docs/strategies.md#strategies-that-change-the-model). Returns their names.
    """
    names = [name for group in optimizer.param_groups
             for name, param in zip(group.get("param_names", [""] * len(group["params"])), group["params"], strict=True)
             if param.grad is None]
    if names:
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        log(f"note: stage {stage_index + 1}: {len(names)} trainable parameter{'s' if len(names) > 1 else ''} "
            f"took no part in the first step's loss and {'stay as they are' if len(names) > 1 else 'stays as it is'}: "
            f"{shown}")
    return names
