"""``cdft predict``: class probabilities of a trained model for any images.

The model, its preprocessing and its class names come from the checkpoint
(:func:`~cdft_core.inference.model_loading.load_trained`), and the probabilities are
the softmax of the logits in float32, exactly as ``cdft eval`` and a run's
``predictions.csv`` compute them, so the three agree image for image.

Output (CSV, or the same rows in JSON): ``path``, ``predicted`` (class name),
``probability`` (its probability), ``prob_<class>`` per class (the column names of
``predictions.csv``), ``group`` (with ``--group-by``) and ``error``: empty for a
predicted image, else why it could not be read (its probabilities are then empty).
Unreadable images are listed, never dropped; an image given twice is two rows (read and
predicted once: :func:`~cdft_core.inference.inputs.distinct_images`). ``--group-by`` adds a table of groups
(:func:`group_table`): mean probabilities over each group's readable images.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cdft_core.errors import UsageError
from cdft_core.inference.inputs import InputImage, distinct_images

#: ``--tta`` choices -> the flips (dims of a B×C×H×W batch) whose softmax is averaged
TTA_FLIPS: dict[str, tuple[tuple[int, ...], ...]] = {
    "none": ((),),
    "flip": ((), (3,)),
    "flip-hv": ((), (3,), (2,), (2, 3)),
}


@dataclass
class PredictionTable:
    """Per image: its path, its group ("" without grouping) and its probabilities (NaN rows
    where ``errors`` holds the reason it could not be read)."""

    classes: list[str]
    paths: list[str]
    probabilities: np.ndarray  # (n, classes) float32, NaN where unreadable
    errors: list[str]  # "" for a predicted image
    groups: list[str] | None = None

    @property
    def failed(self) -> int:
        return sum(1 for e in self.errors if e)


def tta_probabilities(model: torch.nn.Module, batch: torch.Tensor, tta: str) -> torch.Tensor:
    """Mean softmax (float32) of the batch and its flips (``--tta``)."""
    flips = TTA_FLIPS[tta]
    total = None
    for dims in flips:
        probs = torch.softmax(model(batch.flip(dims) if dims else batch).float(), 1)
        total = probs if total is None else total + probs
    assert total is not None
    return total / len(flips)


def predict_images(model: torch.nn.Module, classes: Sequence[str], data_config: dict[str, Any],
                   images: Sequence[InputImage], *, metadata: dict[str, Any] | None = None,
                   batch_size: int | None = None, num_workers: int | str = 0, tta: str = "none",
                   group_by: str | None = None) -> PredictionTable:
    """Predict every image (``model`` as :func:`load_trained` returns it); see the module docstring."""
    from cdft_core.inference.batches import map_images
    from cdft_core.inference.model_loading import inference_precision

    if tta not in TTA_FLIPS:
        raise UsageError(f"--tta {tta!r} is not one of {', '.join(TTA_FLIPS)}")
    groups = group_of(images, group_by) if group_by else None
    config = (metadata or {}).get("cdft_config") or {}
    device = next(model.parameters()).device
    precision = inference_precision(config.get("precision"), device.type)
    size = batch_size or int(config.get("eval_batch_size") or 2 * int(config.get("batch_size") or 32))
    model.eval()
    distinct, slot = distinct_images(images)
    outputs, failed = map_images(distinct, data_config, lambda x: tta_probabilities(model, x, tta), device=device,
                                 batch_size=size, num_workers=num_workers, precision=precision,
                                 description="predicting")
    probabilities = np.full((len(images), len(classes)), np.nan, dtype=np.float32)
    for index, k in enumerate(slot):
        if k in outputs:
            probabilities[index] = outputs[k].numpy()
    errors = [failed.get(k, "") for k in slot]
    return PredictionTable(list(classes), [image.path for image in images], probabilities, errors, groups)


def group_of(images: Sequence[InputImage], group_by: str) -> list[str]:
    """Each image's group: ``column:NAME`` (a column of its input CSV) or a regular
    expression searched in its path (the first capture group, else the whole match).

    An image the rule does not match gets the group "" (left out of the group table);
    a rule that matches no image at all is a usage error (it is surely a typo).
    """
    if group_by.startswith("column:"):
        name = group_by[len("column:"):]
        if not any(name in image.columns for image in images):
            raise UsageError(f"--group-by {group_by!r}: no INPUT CSV has a column {name!r}")
        found = [image.columns.get(name, "").strip() for image in images]
    else:
        try:
            pattern = re.compile(group_by)
        except re.error as exc:
            raise UsageError(f"--group-by {group_by!r} is not a regular expression ({exc})") from exc
        found = []
        for image in images:
            match = pattern.search(image.path)
            found.append("" if match is None else (match.group(1) if pattern.groups else match.group(0)) or "")
    if not any(found):
        raise UsageError(f"--group-by {group_by!r} matches none of the {len(images)} images")
    return found


def group_table(table: PredictionTable) -> list[dict[str, Any]]:
    """Per group (first-seen order): readable image count, mean probabilities, predicted class.

    Unreadable images and images without a group are left out; a group none of whose
    images could be read is listed with 0 images and no prediction. An image is one
    image of its group however often it was given (rows repeated in the input keep their
    rows in the image table, not extra weight in the group's mean).
    """
    if table.groups is None:
        return []
    members: dict[str, list[int]] = {}
    seen: set[tuple[str, str]] = set()
    for index, group in enumerate(table.groups):
        if group:
            members.setdefault(group, [])
            if not table.errors[index] and (group, table.paths[index]) not in seen:
                seen.add((group, table.paths[index]))
                members[group].append(index)
    rows = []
    for group, indices in members.items():
        if indices:
            mean = table.probabilities[indices].mean(axis=0)
            best = int(mean.argmax())
            rows.append({"group": group, "images": len(indices), "predicted": table.classes[best],
                         "probability": float(mean[best]),
                         **{f"prob_{c}": float(p) for c, p in zip(table.classes, mean, strict=True)}})
        else:
            rows.append({"group": group, "images": 0, "predicted": "", "probability": None,
                         **{f"prob_{c}": None for c in table.classes}})
    return rows


def image_rows(table: PredictionTable) -> list[dict[str, Any]]:
    """One dict per image, in input order (the columns of the module docstring)."""
    rows = []
    for index, path in enumerate(table.paths):
        row: dict[str, Any] = {"path": path}
        if table.errors[index]:
            row.update({"predicted": "", "probability": None, **{f"prob_{c}": None for c in table.classes}})
        else:
            probs = table.probabilities[index]
            best = int(probs.argmax())
            row.update({"predicted": table.classes[best], "probability": float(probs[best]),
                        **{f"prob_{c}": float(p) for c, p in zip(table.classes, probs, strict=True)}})
        if table.groups is not None:
            row["group"] = table.groups[index]
        row["error"] = table.errors[index]
        rows.append(row)
    return rows


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """CSV text of dict rows (the first row's keys as the header); floats at full precision, None empty."""
    out = io.StringIO()
    if rows:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(list(rows[0]))
        for row in rows:
            writer.writerow(["" if v is None else repr(v) if isinstance(v, float) else v for v in row.values()])
    return out.getvalue()


def groups_path(output: str) -> str:
    """``<output stem>-groups.csv`` next to ``output``."""
    stem = output[:-4] if output.lower().endswith(".csv") else output
    return f"{stem}-groups.csv"
