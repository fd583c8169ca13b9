"""Classification metrics on a whole evaluation set, computed once with scikit-learn.

The engine gathers every prediction from every process first (docs/method.md#distributed-evaluation), so these numbers
do not depend on the number of processes. Two F1 figures are reported on purpose:

- ``f1_macro``: the standard mean of per-class F1 scores;
- ``f1_paper``: ``2PR/(P+R)`` of the macro precision P and macro recall R, the figure
  the paper's tables report. It is not the same number; keep both for comparison.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cdft_core.text import text_table

#: the scalar metrics, in the order tables show them
SCALARS: tuple[str, ...] = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_paper", "roc_auc")


def compute_metrics(labels: Sequence[int] | np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Metrics of one evaluation: ``labels`` (n,) ints, ``probs`` (n, k) class probabilities.

    Returns a JSON-safe dict: the scalars in :data:`SCALARS` (``roc_auc`` only for two
    classes, with class 1 as positive, and only when both classes occur), per-class
    precision and recall keyed by class name, the confusion matrix (rows: true class,
    columns: predicted class) and the number of images ``n``.
    """
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    y_true = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != y_true.shape[0]:
        raise ValueError(f"probs must be (n, classes) for n={y_true.shape[0]} labels, got {probs.shape}")
    if probs.shape[1] != len(classes):
        raise ValueError(f"probs has {probs.shape[1]} columns for {len(classes)} classes")
    label_ids = list(range(len(classes)))
    y_pred = probs.argmax(axis=1)
    precision, recall, _, support = precision_recall_fscore_support(
        y_true, y_pred, labels=label_ids, average=None, zero_division=0
    )
    # sklearn's macro averages run over the labels that occur in y_true or y_pred, as in
    # the reference implementation; per-class values cover every class
    p_macro = float(precision_score(y_true, y_pred, average="macro", zero_division=0)) if len(y_true) else 0.0
    r_macro = float(recall_score(y_true, y_pred, average="macro", zero_division=0)) if len(y_true) else 0.0
    f1_macro = float(f1_score(y_true, y_pred, average="macro", zero_division=0)) if len(y_true) else 0.0
    out: dict[str, Any] = {
        "n": int(y_true.shape[0]),
        "accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "precision_macro": p_macro,
        "recall_macro": r_macro,
        "f1_macro": f1_macro,
        "f1_paper": paper_f1(p_macro, r_macro),
    }
    if len(classes) == 2 and len(set(y_true.tolist())) == 2:
        out["roc_auc"] = float(roc_auc_score(y_true, probs[:, 1]))
    out["per_class"] = {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "support": int(support[i])}
        for i, name in enumerate(classes)
    }
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=label_ids).tolist()
    return out


def paper_f1(precision: float, recall: float) -> float:
    """The paper's F1: the harmonic mean of macro precision and macro recall."""
    if precision + recall <= 0 or math.isnan(precision + recall):
        return 0.0
    return 2 * precision * recall / (precision + recall)


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """Only the scalar metrics (what TensorBoard and the hparams table show)."""
    return {k: float(metrics[k]) for k in SCALARS if k in metrics}


def format_table(results: dict[str, dict[str, Any]], classes: Sequence[str] | None = None) -> str:
    """A plain text table: one column per evaluation (e.g. ``val``, ``test``), then per-class rows.

    ``results`` maps a column title to a metrics dict from :func:`compute_metrics`.
    """
    titles = list(results)
    rows: list[list[str]] = []
    for key in SCALARS:
        if any(key in m for m in results.values()):
            rows.append([key] + [_fmt(m.get(key)) for m in results.values()])
    rows.append(["images"] + [str(m.get("n", "")) for m in results.values()])
    names = list(classes) if classes is not None else _class_names(results)
    for name in names:
        for part in ("precision", "recall"):
            rows.append([f"{part}[{name}]"] + [_fmt(m.get("per_class", {}).get(name, {}).get(part)) for m in results.values()])
    return text_table(rows, ["metric", *titles], numeric=True)


def format_confusion(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> str:
    """The confusion matrix as text (rows: true class, columns: predicted class)."""
    rows = [[name, *(str(v) for v in row)] for name, row in zip(classes, matrix, strict=True)]
    return text_table(rows, ["true \\ pred", *classes], numeric=True)


def confusion_csv(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> str:
    """CSV text: a header ``true\\pred,<classes>`` then one row per true class."""
    lines = ["true\\pred," + ",".join(classes)]
    lines += [f"{name}," + ",".join(str(int(v)) for v in row) for name, row in zip(classes, matrix, strict=True)]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{float(value):.4f}"


def _class_names(results: dict[str, dict[str, Any]]) -> list[str]:
    for m in results.values():
        if m.get("per_class"):
            return list(m["per_class"])
    return []
