"""A run's per-image predictions (``predictions.csv`` of its final stage) and the one-vs-rest
ROC analysis made from them.

Why from the predictions: ``summary.json`` holds a ROC-AUC only for two classes, and no
curve at all. With every image's class probabilities the report can draw each class's
one-vs-rest curve and give a macro ROC-AUC for any number of classes.

The macro ROC-AUC is the plain mean of the per-class one-vs-rest AUCs (scikit-learn's
``multi_class="ovr", average="macro"``), taken over the classes that have both positive
and negative images in the split: a class with no image has no curve, as it has no
per-class figure in the summary. For two classes it equals the summary's ROC-AUC (class 1
as positive), since class 0's curve is the same curve mirrored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: the file a stage folder holds, and its leading columns in order (then ``prob_<class>`` per class);
#: written by :mod:`cdft_core.training.predictions`, which is not imported here (it needs torch)
PREDICTIONS = "predictions.csv"
COLUMNS = ("split", "image_path", "group", "label", "label_name", "predicted", "predicted_name")


@dataclass(frozen=True)
class Predictions:
    """One split's predictions: true labels (n,) and class probabilities (n, classes)."""

    labels: np.ndarray
    probs: np.ndarray
    classes: tuple[str, ...]


@dataclass(frozen=True)
class Curve:
    """A ROC curve and the area under it."""

    fpr: np.ndarray
    tpr: np.ndarray
    auc: float


def read_predictions(path: str, split: str, classes: Sequence[str]) -> Predictions:
    """The ``split`` rows of a ``predictions.csv``; ValueError (one line) when the file does not fit ``classes``."""
    import pandas as pd

    table = pd.read_csv(path, dtype={"split": str, "image_path": str, "group": str}, keep_default_na=False)
    wanted = [f"prob_{name}" for name in classes]
    missing = [c for c in ("split", "label", *wanted) if c not in table.columns]
    if missing:
        raise ValueError(f"{path} has no column {', '.join(missing)}")
    rows = table[table["split"] == split]
    labels = rows["label"].to_numpy(dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ValueError(f"{path} has labels outside 0..{len(classes) - 1}")
    return Predictions(labels=labels, probs=rows[wanted].to_numpy(dtype=np.float64), classes=tuple(classes))


def pool(parts: Sequence[Predictions]) -> Predictions:
    """Several runs' predictions as one set (their test folds are disjoint under a cv protocol)."""
    classes = parts[0].classes
    if any(p.classes != classes for p in parts):
        raise ValueError("the runs' predictions name different classes")
    return Predictions(np.concatenate([p.labels for p in parts]), np.concatenate([p.probs for p in parts]), classes)


def one_vs_rest(predictions: Predictions) -> dict[str, Curve]:
    """Each class's one-vs-rest ROC curve, for the classes with positive and negative images."""
    from sklearn.metrics import roc_auc_score, roc_curve

    curves: dict[str, Curve] = {}
    for index, name in enumerate(predictions.classes):
        positive = predictions.labels == index
        if positive.all() or not positive.any():
            continue
        scores = predictions.probs[:, index]
        fpr, tpr, _ = roc_curve(positive, scores)
        curves[name] = Curve(fpr=fpr, tpr=tpr, auc=float(roc_auc_score(positive, scores)))
    return curves


def macro_curve(curves: dict[str, Curve]) -> Curve | None:
    """The macro-average curve: every class's TPR interpolated on one FPR grid and averaged;
    its ``auc`` is the macro ROC-AUC (the mean of the per-class areas)."""
    if not curves:
        return None
    grid = np.unique(np.concatenate([c.fpr for c in curves.values()]))
    tpr = np.mean([np.interp(grid, c.fpr, c.tpr) for c in curves.values()], axis=0)
    return Curve(fpr=grid, tpr=tpr, auc=float(np.mean([c.auc for c in curves.values()])))


def macro_roc_auc(predictions: Predictions) -> float | None:
    """The macro one-vs-rest ROC-AUC, or None when no class has both positive and negative images."""
    curve = macro_curve(one_vs_rest(predictions))
    return None if curve is None else curve.auc
