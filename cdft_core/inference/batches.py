"""Run a function over many images in batches, keeping every unreadable image and its reason.

Shared by ``cdft predict`` and ``cdft embed``: images are decoded and preprocessed with
the model's own eval transform (resize, scale, normalise: what ``cdft eval`` uses) in
DataLoader workers; an image that cannot be read or decoded is set aside with its reason
instead of stopping the pass, so the caller can list it (never a silent drop).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from cdft_core.errors import CdftError
from cdft_core.inference.inputs import InputImage, read_image
from cdft_core.text import one_line


class _Images(torch.utils.data.Dataset):
    """``(index, tensor or None, error)`` per image; the error is "" for a good image."""

    def __init__(self, images: Sequence[InputImage], transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.paths = [image.path for image in images]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return index, self.transform(read_image(self.paths[index])), ""
        except CdftError as exc:
            return index, None, _reason(str(exc), self.paths[index])
        except Exception as exc:  # a transform failing on a strange image: still that image's problem
            return index, None, one_line(f"{type(exc).__name__}: {exc}")


def _reason(message: str, path: str) -> str:
    """The error without the repeated path (the row already names the image)."""
    return one_line(message.replace(f"image {path!r} ", "image ").replace(f"image {path!r}", "image"))


def _collate(items: list[tuple[int, torch.Tensor | None, str]]) -> tuple[list[int], torch.Tensor | None, dict[int, str]]:
    good = [(i, x) for i, x, _ in items if x is not None]
    errors = {i: e for i, x, e in items if x is None}
    stacked = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], stacked, errors


def map_images(images: Sequence[InputImage], data_config: Mapping[str, Any], fn: Callable[[torch.Tensor], torch.Tensor],
               *, device: torch.device, batch_size: int, num_workers: int | str, precision: str,
               description: str) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
    """``fn(batch)`` (rows: one per image, moved to the CPU as float32) for every readable
    image, keyed by its index in ``images``, and the reason for every other one."""
    from cdft_core.data.transforms import eval_transform
    from cdft_core.training.evaluation import autocast
    from cdft_core.training.loaders import resolve_num_workers
    from cdft_core.training.log import progress_bar

    workers = resolve_num_workers(num_workers)
    loader = torch.utils.data.DataLoader(_Images(images, eval_transform(data_config)), batch_size=batch_size,
                                         shuffle=False, num_workers=workers, collate_fn=_collate)
    bar = progress_bar(True, len(loader), 0, description, unit="batch")
    outputs: dict[int, torch.Tensor] = {}
    errors: dict[int, str] = {}
    try:
        with torch.no_grad():
            for indices, batch, failed in loader:
                errors.update(failed)
                if batch is not None:
                    with autocast(precision, device):
                        rows = fn(batch.to(device, non_blocking=True)).float().cpu()
                    outputs.update(zip(indices, rows, strict=True))
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return outputs, errors
