"""The report's figures, as PNG files: per row a confusion matrix, ROC curves and learning
curves; per dataset a chart comparing the strategies on each backbone.

Why these choices:

- confusion matrices are summed over a row's runs: under a cross-validation protocol the
  test folds are disjoint, so the sum is every test image once. Counts show how many
  images a cell holds; row percentages (each true class sums to 100 %) compare classes of
  different sizes. A class with no test image has an empty row, shown as such;
- ROC curves pool the test predictions of the runs that wrote them (one-vs-rest per class,
  and the macro average); the title says how many runs that is, so a curve made of some
  runs is never taken for the whole row;
- learning curves show the validation accuracy and loss per epoch, one column per stage
  (a staged strategy restarts its epochs), as the mean over the runs with a ±1 standard
  deviation band;
- the strategy chart puts each backbone's strategies side by side: mean ± std bars with n.

Only complete runs reach here (:mod:`cdft_core.reports.collect`). Figures are drawn with
matplotlib's object API on the Agg canvas: no display, no global pyplot state.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cdft_core.reports.predictions import macro_curve, one_vs_rest, pool
from cdft_core.reports.rows import LABELS, Row

DPI = 100
#: the metrics the strategy chart shows, one panel each
CHART_METRICS = ("accuracy", "f1_macro")


@dataclass(frozen=True)
class Plot:
    """A written figure: its file (relative to the report directory), title, kind and row (None: over rows)."""

    file: str
    title: str
    kind: str
    row: str | None = None


def draw_all(rows: Sequence[Row], split: str, out_dir: str) -> tuple[list[Plot], list[str]]:
    """Every figure of the report into ``out_dir/plots``; returns them and notes on what was left out."""
    os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
    plots: list[Plot] = []
    notes: list[str] = []
    for row in rows:
        for kind, draw in (("confusion", confusion_figure), ("roc", roc_figure), ("learning", learning_figure)):
            figure, title, skipped = draw(row, split)
            notes += skipped
            if figure is not None:
                plots.append(_save(figure, out_dir, f"{kind}-{row.slug}.png", title, kind, row.slug))
    for dataset in sorted({row.dataset for row in rows}):
        figure, title = strategy_chart([r for r in rows if r.dataset == dataset], split)
        plots.append(_save(figure, out_dir, f"strategies-{_safe(dataset)}.png", title, "strategies"))
    return plots, notes


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in text)


def _save(figure: Any, out_dir: str, name: str, title: str, kind: str, row: str | None = None) -> Plot:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    figure.savefig(os.path.join(out_dir, "plots", name), dpi=DPI)
    return Plot(file=f"plots/{name}", title=title, kind=kind, row=row)


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _wrapped(text: str, width_inches: float, fontsize: float = 9) -> str:
    """``text`` broken into lines that fit ``width_inches`` at ``fontsize`` (a row's label can
    carry a long setting, ``staged (batch_size=2, epochs=3, ...)``: cut off, it would hide
    what tells two rows apart)."""
    import textwrap

    return textwrap.fill(text, width=max(20, int(width_inches * 130 / fontsize)), break_on_hyphens=False)


# -- confusion matrices -------------------------------------------------------------------
def confusion_figure(row: Row, split: str) -> tuple[Any, str, list[str]]:
    """Counts and row percentages of the row's test confusion matrices, summed over its runs."""
    classes = row.samples[0].run.classes
    matrices = [s.run.summary[split].get("confusion_matrix") for s in row.kept]
    usable = [np.asarray(m, dtype=np.int64) for m in matrices if m is not None]
    if not usable or any(m.shape != (len(classes), len(classes)) for m in usable):
        return None, "", [f"{row.label}: no confusion matrix (a run's summary has none, or its classes differ)"]
    counts = np.sum(usable, axis=0)
    totals = counts.sum(axis=1, keepdims=True)
    percent = np.divide(counts * 100.0, totals, out=np.zeros(counts.shape), where=totals > 0)
    size = max(3.2, 0.55 * len(classes) + 2.2)
    figure = _figure(2 * size + 0.6, size)
    title = f"{row.label}: {split} confusion matrix, summed over {len(usable)} run(s)"
    figure.suptitle(_wrapped(title, 2 * size + 0.6), fontsize=9)
    for axes, values, fmt, name in ((figure.add_subplot(1, 2, 1), counts, "{:d}", "images"),
                                    (figure.add_subplot(1, 2, 2), percent, "{:.1f}%", "% of the true class")):
        image = axes.imshow(values, cmap="Blues", vmin=0)
        figure.colorbar(image, ax=axes, shrink=0.8, label=name)
        axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
        axes.set_yticks(range(len(classes)), classes, fontsize=8)
        axes.set_xlabel("predicted")
        axes.set_ylabel("true")
        high = values.max() / 2 if values.max() > 0 else 1
        for i in range(len(classes)):
            for j in range(len(classes)):
                text = "–" if totals[i, 0] == 0 else fmt.format(values[i, j].item())
                axes.text(j, i, text, ha="center", va="center", fontsize=7,
                          color="white" if values[i, j] > high else "black")
    return figure, title, []


# -- ROC curves ---------------------------------------------------------------------------
def roc_figure(row: Row, split: str) -> tuple[Any, str, list[str]]:
    """One-vs-rest ROC curves of the pooled predictions, with the macro average."""
    with_predictions = [s for s in row.kept if s.predictions is not None]
    notes = [f"{row.label}: no ROC curve for {s.run.path} ({s.no_predictions})"
             for s in row.kept if s.predictions is None]
    if not with_predictions:
        return None, "", notes
    try:
        pooled = pool([s.predictions for s in with_predictions])
    except ValueError as exc:
        return None, "", [*notes, f"{row.label}: no ROC curve ({exc})"]
    curves = one_vs_rest(pooled)
    macro = macro_curve(curves)
    if macro is None:
        return None, "", [*notes, f"{row.label}: no ROC curve (no class has both positive and negative images)"]
    figure = _figure(5.6, 4.6)
    axes = figure.add_subplot(1, 1, 1)
    for name, curve in curves.items():
        axes.plot(curve.fpr, curve.tpr, linewidth=1.2, label=f"{name} (AUC {curve.auc:.3f})")
    axes.plot(macro.fpr, macro.tpr, color="black", linestyle="--", linewidth=2,
              label=f"macro (mean AUC {macro.auc:.3f})")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.01)
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.legend(fontsize=7, loc="lower right")
    title = (f"{row.label}: {split} ROC, one-vs-rest, pooled predictions of "
             f"{len(with_predictions)} of {row.n} run(s)")
    axes.set_title(_wrapped(title, 5.0, 8), fontsize=8)
    return figure, title, notes


# -- learning curves ----------------------------------------------------------------------
def learning_series(row: Row) -> dict[tuple[int, str], dict[str, dict[int, list[float]]]]:
    """(stage index, stage name) -> metric -> epoch -> the runs' validation values.

    A run's line for a stage and epoch is its last one (a resumed run may have logged an
    epoch twice).
    """
    series: dict[tuple[int, str], dict[str, dict[int, list[float]]]] = {}
    for sample in row.kept:
        last: dict[tuple[int, str, int], dict[str, Any]] = {}
        for line in sample.run.metric_lines():
            if line.get("split") == "val" and isinstance(line.get("epoch"), int):
                last[(int(line.get("stage_index", 1)), str(line.get("stage", "")), line["epoch"])] = line
        for (index, stage, epoch), line in last.items():
            for metric in ("accuracy", "loss"):
                if isinstance(line.get(metric), (int, float)):
                    series.setdefault((index, stage), {}).setdefault(metric, {}).setdefault(epoch, []).append(
                        float(line[metric]))
    return dict(sorted(series.items()))


def learning_figure(row: Row, split: str) -> tuple[Any, str, list[str]]:
    """Validation accuracy and loss per epoch, one column per stage: mean over runs, ±1 std band."""
    series = learning_series(row)
    if not series:
        return None, "", [f"{row.label}: no learning curves (no validation lines in metrics.jsonl)"]
    width = max(4.2, 3.6 * len(series))
    figure = _figure(width, 5.4)
    title = f"{row.label}: validation accuracy and loss per epoch (mean over {row.n} run(s), band ±1 std)"
    figure.suptitle(_wrapped(title, width), fontsize=9)
    for column, ((index, stage), metrics) in enumerate(series.items()):
        for line, metric in enumerate(("accuracy", "loss")):
            axes = figure.add_subplot(2, len(series), line * len(series) + column + 1)
            points = metrics.get(metric, {})
            epochs = sorted(points)
            if epochs:
                mean = np.array([np.mean(points[e]) for e in epochs])
                std = np.array([np.std(points[e], ddof=1) if len(points[e]) > 1 else 0.0 for e in epochs])
                axes.plot(epochs, mean, marker="o", markersize=3)
                axes.fill_between(epochs, mean - std, mean + std, alpha=0.25)
            axes.set_title(f"stage {index} ({stage})" if line == 0 else "", fontsize=8)
            axes.set_xlabel("epoch" if line == 1 else "")
            axes.set_ylabel(f"val {metric}" if column == 0 else "")
            axes.xaxis.get_major_locator().set_params(integer=True)
    return figure, title, []


# -- strategies per backbone --------------------------------------------------------------
def strategy_chart(rows: Sequence[Row], split: str) -> tuple[Any, str]:
    """One dataset's rows as grouped bars: backbones along x, one bar per strategy (and setting), mean ± std, n."""
    backbones = list(dict.fromkeys(r.backbone for r in rows))
    variants = list(dict.fromkeys((r.strategy, r.setting) for r in rows))
    width = 0.8 / len(variants)
    inches = max(6.5, 0.45 * len(backbones) * len(variants) + 2.5)
    labels = [_wrapped(f"{strategy} ({setting})" if setting else strategy, inches / 2 - 0.4, 7)
              for strategy, setting in variants]
    legend_lines = sum(label.count("\n") + 1 for label in labels[::2])  # two columns
    figure = _figure(inches, 3.4 * len(CHART_METRICS) + 0.2 * legend_lines + 0.3)
    dataset = rows[0].dataset
    title = f"{dataset}: strategies per backbone ({split}, mean ± std over runs, n on each bar)"
    figure.suptitle(f"{dataset}: strategies per backbone\n({split}, mean ± std over runs, n on each bar)", fontsize=9)
    for panel, metric in enumerate(CHART_METRICS):
        axes = figure.add_subplot(len(CHART_METRICS), 1, panel + 1)
        for k, (strategy, setting) in enumerate(variants):
            xs, means, stds, ns = [], [], [], []
            for b, backbone in enumerate(backbones):
                row = next((r for r in rows if (r.backbone, r.strategy, r.setting) == (backbone, strategy, setting)),
                           None)
                values = row.values(metric) if row else []
                if values:
                    xs.append(b - 0.4 + width * (k + 0.5))
                    means.append(float(np.mean(values)))
                    stds.append(float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)
                    ns.append(len(values))
            bars = axes.bar(xs, means, width=width * 0.95, yerr=stds, capsize=2, label=labels[k],
                            color=f"C{k % 10}")
            for bar, mean, std, n in zip(bars, means, stds, ns, strict=True):
                axes.annotate(f"n={n}", (bar.get_x() + bar.get_width() / 2, mean + std), xytext=(0, 2),
                              textcoords="offset points", ha="center", va="bottom", fontsize=6)
        axes.set_xticks(range(len(backbones)), backbones, rotation=15, ha="right", fontsize=7)
        axes.set_ylabel(LABELS[metric])
        axes.set_ylim(0, 1.05)
    # one legend for both panels, below them: inside an axes a long label squeezed the bars away
    figure.legend(*figure.axes[0].get_legend_handles_labels(), loc="outside lower center", fontsize=7,
                  ncols=min(2, len(variants)))
    return figure, title
