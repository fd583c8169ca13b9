"""TensorBoard logging for a run: scalars, a confusion-matrix figure, an input grid, hparams.

Only rank 0 creates a writer; on other ranks :class:`TensorBoardLog` is built with
``enabled=False`` and every method does nothing, so the engine never branches on rank
to log. Everything goes into the run's own event files, including the hparams summary:
``SummaryWriter.add_hparams`` would open a separate timestamped sub-run, so the three
hparams summaries are written with the run's own file writer instead, and the metric
values as scalars under the same tags — runs then compare side by side in the HParams tab.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

#: prefix of the metric tags the HParams tab shows
HPARAM_METRIC_PREFIX = "hparams/"


class TensorBoardLog:
    """A thin, rank-aware wrapper around ``torch.utils.tensorboard.SummaryWriter``."""

    def __init__(self, log_dir: str, *, enabled: bool, purge_step: int | None = None) -> None:
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: after a resume, TensorBoard drops the events a killed run wrote
            # past the checkpoint, so curves do not double back
            self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step, flush_secs=30)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, float(value), step)

    def confusion_matrix(self, tag: str, matrix: Sequence[Sequence[int]], classes: Sequence[str], step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, render_confusion_matrix(matrix, classes), step, dataformats="HWC")

    def input_grid(self, tag: str, images: torch.Tensor, mean: Sequence[float], std: Sequence[float], step: int = 0) -> None:
        """A grid of (normalised) model inputs, shown as the model sees them after augmentation."""
        if self.writer is None:
            return
        from torchvision.utils import make_grid

        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        shown = (images.detach().float().cpu() * s + m).clamp(0, 1)
        self.writer.add_image(tag, make_grid(shown, nrow=min(8, shown.shape[0]), padding=2), step)

    def hparams(self, config: Mapping[str, Any], metrics: Mapping[str, float], step: int) -> None:
        """The run's configuration with its final metrics, in the run's own event files."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        metric_dict = {f"{HPARAM_METRIC_PREFIX}{k}": float(v) for k, v in metrics.items()}
        exp, ssi, sei = hparams(flatten_hparams(config), metric_dict)
        file_writer = self.writer.file_writer
        for summary in (exp, ssi, sei):
            file_writer.add_summary(summary, step)
        for tag, value in metric_dict.items():
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def flatten_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"a.b": value}`` with values TensorBoard accepts (None -> "none")."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_hparams(value, prefix=f"{name}."))
        elif value is None:
            out[name] = "none"
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def render_confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str], cell: int = 64) -> np.ndarray:
    """An RGB image (H×W×3 uint8) of the confusion matrix: shaded cells with their counts.

    Drawn with Pillow (already a dependency) rather than matplotlib. Rows are true
    classes, columns predicted classes; the shade is the row-normalised rate.
    """
    from PIL import Image, ImageDraw, ImageFont

    m = np.asarray(matrix, dtype=np.int64)
    k = m.shape[0]
    font = ImageFont.load_default()
    label_w = max(60, 7 * max((len(c) for c in classes), default=4) + 12)
    top = 36
    width, height = label_w + k * cell + 8, top + k * cell + 24
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((label_w, 4), "predicted", fill="black", font=font)
    draw.text((4, height - 18), "true", fill="black", font=font)
    rows = m.sum(axis=1, keepdims=True).clip(min=1)
    rates = m / rows
    for j, name in enumerate(classes):
        draw.text((label_w + j * cell + 4, top - 16), str(name)[: cell // 7], fill="black", font=font)
    for i, name in enumerate(classes):
        y = top + i * cell
        draw.text((4, y + cell // 2 - 6), str(name)[: label_w // 7], fill="black", font=font)
        for j in range(k):
            x = label_w + j * cell
            shade = int(255 - 200 * rates[i, j])
            colour = (shade, shade, 255)
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour, outline="grey")
            ink = "white" if rates[i, j] > 0.5 else "black"
            draw.text((x + cell // 2 - 3 * len(str(m[i, j])), y + cell // 2 - 6), str(m[i, j]), fill=ink, font=font)
    return np.asarray(image, dtype=np.uint8)
