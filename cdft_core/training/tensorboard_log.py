"""TensorBoard logging for a run: scalars, a confusion-matrix figure, an input grid, hparams.

Only rank 0 creates a writer; on other ranks :class:`TensorBoardLog` is built with
``enabled=False`` and every method does nothing, so the engine never branches on rank
to log. Everything goes into the run's own event files, including the hparams summary:
``SummaryWriter.add_hparams`` would open a separate timestamped sub-run, so the three
hparams summaries are written with the run's own file writer instead, and the metric
values as scalars under the same tags — runs then compare side by side in the HParams tab.

The tag names are the same for every strategy (docs/training.md#tensorboard), so runs
overlay on one chart; :mod:`cdft_core.training.records` decides what is logged when.
Figures are drawn with matplotlib's Agg canvas (no display, no pyplot global state).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

#: prefix of the metric tags the HParams tab shows
HPARAM_METRIC_PREFIX = "hparams/"
#: dots per inch of the rendered figures (their pixel size is their size in inches times this)
FIGURE_DPI = 100
#: what a confusion-matrix row of a class with no image in the split says
ABSENT_TEXT = "absent: no image of this class in the split"


class TensorBoardLog:
    """A thin, rank-aware wrapper around ``torch.utils.tensorboard.SummaryWriter``."""

    def __init__(self, log_dir: str, *, enabled: bool, purge_step: int | None = None) -> None:
        self.enabled = enabled
        self.writer = None
        self._kept: set[tuple[str, int]] = set()
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: after a resume, TensorBoard drops the events a killed run wrote
            # past the checkpoint, so curves do not double back. Those at the checkpoint's
            # own step stay; a stage completion cut short there is redone by the resumed
            # run, which must not write its test points a second time beside them.
            if purge_step is not None:
                self._kept = {(tag, purge_step - 1) for tag in tags_at(log_dir, purge_step - 1)}
            self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step, flush_secs=30)

    def _writes(self, tag: str, step: int) -> bool:
        return self.writer is not None and (tag, step) not in self._kept

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._writes(tag, step):
            self.writer.add_scalar(tag, float(value), step)

    def confusion_matrix(self, tag: str, matrix: Sequence[Sequence[int]], classes: Sequence[str], step: int,
                         title: str = "confusion matrix") -> None:
        if self._writes(tag, step):
            image = render_confusion_matrix(matrix, classes, title=title)
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def input_grid(self, tag: str, images: torch.Tensor, names: Sequence[str], mean: Sequence[float],
                   std: Sequence[float], step: int = 0) -> None:
        """Model inputs (normalised, after augmentation) as the model sees them, one row per class."""
        if self._writes(tag, step):
            self.writer.add_image(tag, render_input_grid(images, names, mean, std), step, dataformats="HWC")

    def hparams(self, config: Mapping[str, Any], metrics: Mapping[str, float], step: int) -> None:
        """The run's resolved settings with its final metrics, in the run's own event files."""
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


def tags_at(log_dir: str, step: int) -> set[str]:
    """The tags of the summaries already written in ``log_dir``'s event files at ``step``.

    Read with fsspec (local paths and URLs alike) straight from the TFRecord framing; a
    record cut short by a kill ends the file. Unreadable files count as empty: the cost
    is a duplicate point, never a failed resume.
    """
    import struct

    import fsspec
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto import event_pb2

    tags: set[str] = set()
    try:
        fs, root = fsspec.core.url_to_fs(log_dir)
        files = fs.glob(f"{root.rstrip('/')}/events.out.tfevents.*")
    except (OSError, ValueError):
        return tags
    for name in files:
        try:
            size = int(fs.size(name))
            with fs.open(name, "rb") as handle:
                while len(header := handle.read(12)) == 12:  # length (8 bytes), its CRC (4)
                    (length,) = struct.unpack("<Q", header[:8])
                    if length > size - handle.tell():  # a damaged header: never read past the file
                        break
                    data = handle.read(length)
                    handle.read(4)  # the data's CRC
                    if len(data) < length:
                        break
                    event = event_pb2.Event.FromString(data)
                    if event.step == step and event.HasField("summary"):
                        tags.update(value.tag for value in event.summary.value)
        except (OSError, ValueError, DecodeError):
            continue
    return tags


# -- hparams ------------------------------------------------------------------------------
def flatten_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, float | str]:
    """Nested settings -> ``{"a.b": value}`` with one TensorBoard type per kind of value.

    The HParams tab compares runs key by key, so a key must have the same type in every
    run: numbers (ints included) are floats, every other value is a string (bools are
    ``"true"``/``"false"``: torch would silently make them numbers), and None is left out
    (a key that is unset in one run is then empty there, never a string beside numbers).
    """
    out: dict[str, float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_hparams(value, prefix=f"{name}."))
        elif value is None:
            continue
        elif isinstance(value, bool):
            out[name] = "true" if value else "false"
        elif isinstance(value, (int, float)):
            out[name] = float(value)
        elif isinstance(value, (list, tuple)):
            out[name] = ",".join(str(v) for v in value)
        else:
            out[name] = str(value)
    return out


# -- the confusion matrix ---------------------------------------------------------------
def confusion_cell_text(matrix: Sequence[Sequence[int]]) -> list[list[str]]:
    """Each cell's text: its count and its share of the row (the true class) in percent.

    A class with no image in the split (an all-zero row) has no rates: its cells are empty
    (the figure marks the row as absent instead of showing 0%). Rounding never turns a
    non-zero share into ``0%`` or a partial one into ``100%`` (``<1%``, ``>99%``).
    """
    m = np.asarray(matrix, dtype=np.int64)
    text: list[list[str]] = []
    for row in m:
        total = int(row.sum())
        text.append([f"{int(c)}\n{_percent(int(c) / total)}" if total else "" for c in row])
    return text


def _percent(rate: float) -> str:
    shown = f"{100 * rate:.0f}"
    if rate > 0 and shown == "0":
        return "<1%"
    if rate < 1 and shown == "100":
        return ">99%"
    return f"{shown}%"


def text_colour(rgb: Sequence[float]) -> str:
    """Black or white, whichever reads better on a cell of colour ``rgb`` (0..1 floats)."""
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb[:3]]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    return "white" if luminance < 0.18 else "black"  # 0.18: equal contrast against black and white


def confusion_figure_size(num_classes: int) -> tuple[float, float]:
    """(width, height) in inches: cells of about 0.9 inch plus room for wrapped labels and the title."""
    side = max(3.0, 0.9 * num_classes)
    return side + 2.8, side + 2.6


def wrap_label(name: str, width: int = 14) -> str:
    """A class name on lines of about ``width`` characters, broken after spaces, hyphens and
    underscores where possible (never cut short: every character stays)."""
    name = str(name)
    if "_ " in name:  # the underscore trick below would lose this name's own spaces
        return "\n".join(textwrap.wrap(name, width=width)) or name
    lines = textwrap.wrap(name.replace("_", "_ "), width=width + 1)
    return "\n".join(line.replace("_ ", "_") for line in lines) or name


def render_confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str],
                            title: str = "confusion matrix") -> np.ndarray:
    """An RGB image (H×W×3 uint8) of the confusion matrix, sized by :func:`confusion_figure_size`.

    Rows are true classes, columns predicted classes; the shade is the row share, each
    cell shows its count and row percentage (:func:`confusion_cell_text`) in black or
    white by contrast; a class absent from the split gets a grey row marked as such.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = np.asarray(matrix, dtype=np.int64)
    k = m.shape[0]
    totals = m.sum(axis=1, keepdims=True)
    rates = np.where(totals > 0, m / np.maximum(totals, 1), np.nan)  # NaN: an absent class's row
    figure = Figure(figsize=confusion_figure_size(k), dpi=FIGURE_DPI, layout="constrained")
    canvas = FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    cmap = _colormap("Blues")
    ax.imshow(np.ma.masked_invalid(rates), cmap=cmap, vmin=0.0, vmax=1.0, aspect="equal")
    size = 9 if k <= 6 else 7 if k <= 12 else 5
    for i, row in enumerate(confusion_cell_text(m)):
        if totals[i, 0] == 0:
            ax.text((k - 1) / 2, i, ABSENT_TEXT, ha="center", va="center", fontsize=size, color="dimgray",
                    style="italic", wrap=True)
            continue
        for j, text in enumerate(row):
            ax.text(j, i, text, ha="center", va="center", fontsize=size, color=text_colour(cmap(rates[i, j])))
    absent = {i for i in range(k) if totals[i, 0] == 0}
    ax.set_xticks(range(k), [wrap_label(c) for c in classes], rotation=45, ha="right", rotation_mode="anchor",
                  fontsize=size)
    ax.set_yticks(range(k), [wrap_label(c) + ("\n(absent)" if i in absent else "") for i, c in enumerate(classes)],
                  fontsize=size)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10, wrap=True)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _colormap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="#e6e6e6")  # bad: an absent class's row


# -- the input grid ---------------------------------------------------------------------
def pick_grid(labels: Sequence[int], order: Sequence[int], classes: Sequence[str],
              per_class: int) -> list[tuple[int, str]]:
    """``(image index, class name)`` of the first ``per_class`` images of each class in ``order``.

    Class by class in class order, so the grid shows several classes whatever the data
    order; ``order`` is the seeded first-epoch order, so the choice is deterministic.
    """
    chosen: dict[int, list[int]] = {label: [] for label in range(len(classes))}
    for index in order:
        picked = chosen[int(labels[index])]
        if len(picked) < per_class:
            picked.append(int(index))
    return [(index, classes[label]) for label, picked in chosen.items() for index in picked]


def render_input_grid(images: torch.Tensor, names: Sequence[str], mean: Sequence[float],
                      std: Sequence[float]) -> np.ndarray:
    """An RGB image (H×W×3 uint8): one row per class (labelled with its name), de-normalised inputs.

    ``images`` (n×3×H×W) are the model's inputs; ``names`` the class of each, grouped into
    rows in order of first appearance.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    shown = (images.detach().float().cpu() * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        rows.setdefault(str(name), []).append(i)
    cols = max((len(v) for v in rows.values()), default=1)
    figure = Figure(figsize=(1.8 + 1.2 * cols, 0.6 + 1.2 * max(len(rows), 1)), dpi=FIGURE_DPI, layout="constrained")
    canvas = FigureCanvasAgg(figure)
    axes = np.atleast_2d(figure.subplots(max(len(rows), 1), cols, squeeze=False))
    for r, (name, indices) in enumerate(rows.items()):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(indices):
                ax.imshow(shown[indices[c]], interpolation="nearest")
            else:
                ax.set_axis_off()
        axes[r, 0].set_ylabel(wrap_label(name), rotation=0, ha="right", va="center", fontsize=9)
    figure.suptitle("augmented training inputs (first epoch), by class", fontsize=10)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def grid_per_class(num_classes: int, limit: int = 64) -> int:
    """Images per class in the grid: up to 4, fewer when there are many classes (``limit`` in all)."""
    return max(1, min(4, math.floor(limit / max(num_classes, 1))))
