"""Classification metrics on a whole evaluation set, computed once with scikit-learn.

The engine gathers every prediction from every process first (docs/method.md#distributed-evaluation), so these numbers
do not depend on the number of processes. Two F1 figures are reported on purpose:

- ``f1_macro``: the standard mean of per-class F1 scores;
- ``f1_paper``: ``2PR/(P+R)`` of the macro precision P and macro recall R, the figure
  the paper's tables report. It is not the same number; keep both for comparison.

Macro averages run over the classes present in the evaluated split's true labels only
(``macro_over``); a class with no image there is shown as absent, never as 0.0
(see :func:`compute_metrics`).

Where images come from patients (the split table has a group column), the figures the
BreakHis literature reports per patient are added (:func:`patient_metrics`): image-level
accuracy over-weights patients with many images, and a diagnosis is made per patient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cdft_core.text import text_table

#: the scalar metrics, in the order tables show them
SCALARS: tuple[str, ...] = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_paper", "roc_auc",
                             "patient_recognition_rate", "patient_accuracy")


def compute_metrics(labels: Sequence[int] | np.ndarray, probs: np.ndarray, classes: Sequence[str],
                    groups: Sequence[str] | None = None) -> dict[str, Any]:
    """Metrics of one evaluation: ``labels`` (n,) ints, ``probs`` (n, k) class probabilities,
    ``groups`` (n,) the patient (group) of each image, ``""`` for none, or None.

    Definition (docs/method.md#metrics), with predictions ``argmax(probs)``:

    - ``accuracy``: the share of images predicted as their true class;
    - macro averages run over exactly the classes present in the true ``labels``
      (listed, in class order, as ``macro_over``), whatever the model predicted:
      ``precision_macro``, ``recall_macro`` and ``f1_macro`` are the plain means of the
      per-class precision, recall and F1 over those classes (scikit-learn with
      ``labels=`` the present classes, ``zero_division=0``: a present class never
      predicted has precision 0). A class absent from the true labels takes no part, so
      predicting it only counts as a wrong answer for the true class of that image;
    - ``f1_paper``: :func:`paper_f1` of the same ``precision_macro`` and ``recall_macro``;
    - ``roc_auc``: only for two classes, with class 1 as positive, and only when both
      classes occur in the true labels;
    - ``per_class``: keyed by class name, every class; a class present in the true labels
      has ``{"present": True, "precision", "recall", "f1", "support"}`` (floats, support
      > 0); an absent class has ``{"present": False, "precision": None, "recall": None,
      "f1": None, "support": 0}`` (no images: shown as absent, not as 0.0);
    - ``confusion_matrix``: rows the true class, columns the predicted class, every
      class (an absent class is an all-zero row);
    - ``n``: the number of images. With no images at all the scalars are 0.0 and
      ``macro_over`` is empty;
    - ``patient_recognition_rate`` and ``patient_accuracy``: :func:`patient_metrics`, only
      when some image has a group (both keys are absent otherwise).

    The result is JSON-safe (it goes to ``summary.json`` and ``metrics.jsonl``).
    """
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    y_true = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != y_true.shape[0]:
        raise ValueError(f"probs must be (n, classes) for n={y_true.shape[0]} labels, got {probs.shape}")
    if probs.shape[1] != len(classes):
        raise ValueError(f"probs has {probs.shape[1]} columns for {len(classes)} classes")
    if y_true.size and (y_true.min() < 0 or y_true.max() >= len(classes)):
        raise ValueError(f"labels must lie in 0..{len(classes) - 1} for {len(classes)} classes, "
                         f"got {sorted(set(y_true.tolist()) - set(range(len(classes))))}")
    label_ids = list(range(len(classes)))
    present = sorted(set(y_true.tolist()))  # the classes the macro averages run over
    y_pred = probs.argmax(axis=1)
    if present:
        precision, recall, f1, support = precision_recall_fscore_support(
            y_true, y_pred, labels=label_ids, average=None, zero_division=0
        )
        macro = precision_recall_fscore_support(y_true, y_pred, labels=present, average="macro", zero_division=0)
        p_macro, r_macro, f1_macro = (float(v) for v in macro[:3])
    else:  # no images: sklearn refuses empty input; every class is absent
        precision = recall = f1 = support = np.zeros(len(classes))
        p_macro = r_macro = f1_macro = 0.0
    out: dict[str, Any] = {
        "n": int(y_true.shape[0]),
        "accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "precision_macro": p_macro,
        "recall_macro": r_macro,
        "f1_macro": f1_macro,
        "f1_paper": paper_f1(p_macro, r_macro),
        "macro_over": [classes[i] for i in present],
    }
    if len(classes) == 2 and len(present) == 2:
        out["roc_auc"] = float(roc_auc_score(y_true, probs[:, 1]))
    if groups is not None:
        out.update(patient_metrics(y_true, probs, groups))
    out["per_class"] = {
        name: (
            {"present": True, "precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
             "support": int(support[i])}
            if support[i] > 0
            else {"present": False, "precision": None, "recall": None, "f1": None, "support": 0}
        )
        for i, name in enumerate(classes)
    }
    out["confusion_matrix"] = (
        confusion_matrix(y_true, y_pred, labels=label_ids).tolist() if present else [[0] * len(classes) for _ in classes]
    )
    return out


def patient_metrics(labels: Sequence[int] | np.ndarray, probs: np.ndarray, groups: Sequence[str]) -> dict[str, float]:
    """The patient-level figures of one evaluation (docs/method.md#patient-level-metrics);
    ``{}`` when no image has a group.

    Images with an empty group (``""``) take no part; each other value is one patient.

    - ``patient_recognition_rate``: the mean over patients of the share of that patient's
      images predicted (``argmax(probs)``) as their true class — every patient weighs the
      same, however many images it has;
    - ``patient_accuracy``: the share of patients whose mean class-probability vector
      (over its images) has its largest entry at the patient's label. A patient whose
      images carry several labels takes the most frequent one, a tie going to the
      smallest label index; a tie between probabilities also goes to the smallest index
      (``argmax``).
    """
    y_true = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if len(groups) != y_true.shape[0]:
        raise ValueError(f"groups has {len(groups)} entries for {y_true.shape[0]} labels")
    members: dict[str, list[int]] = {}
    for row, group in enumerate(groups):
        if group != "":
            members.setdefault(group, []).append(row)
    if not members:
        return {}
    correct = probs.argmax(axis=1) == y_true if y_true.size else np.zeros(0, dtype=bool)
    rates, hits = [], []
    for rows in members.values():
        rates.append(float(correct[rows].mean()))
        label = int(np.bincount(y_true[rows]).argmax())  # the majority label; a tie: the smallest
        hits.append(int(probs[rows].mean(axis=0).argmax()) == label)
    return {"patient_recognition_rate": float(np.mean(rates)), "patient_accuracy": float(np.mean(hits))}


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

    ``results`` maps a column title to a metrics dict from :func:`compute_metrics`. A class
    with no image in a column's split shows ``absent`` in that column (not 0.0000); when a
    column's macro averages leave a class out, a ``macro over`` row says how many classes
    they cover (e.g. ``2/3``).
    """
    titles = list(results)
    rows: list[list[str]] = []
    for key in SCALARS:
        if any(key in m for m in results.values()):
            rows.append([key] + [_fmt(m.get(key)) for m in results.values()])
    rows.append(["images"] + [str(m.get("n", "")) for m in results.values()])
    names = list(classes) if classes is not None else _class_names(results)
    if any(_absent(m, name) for m in results.values() for name in names):
        rows.append(["macro over"] + [_macro_over(m, names) for m in results.values()])
    for name in names:
        for part in ("precision", "recall"):
            cells = [ABSENT if _absent(m, name) else _fmt(m.get("per_class", {}).get(name, {}).get(part))
                     for m in results.values()]
            rows.append([f"{part}[{name}]", *cells])
    return text_table(rows, ["metric", *titles], numeric=True)


def format_confusion(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> str:
    """The confusion matrix as text (rows: true class, columns: predicted class).

    A class with no image in the split (an all-zero row) is marked ``(absent)`` and its row
    shows ``-``; its column still counts the images wrongly predicted as it.
    """
    rows = []
    for name, row in zip(classes, matrix, strict=True):
        if any(int(v) for v in row):
            rows.append([name, *(str(v) for v in row)])
        else:
            rows.append([f"{name} {ABSENT_MARK}", *("-" for _ in row)])
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


#: how tables show a class with no image in the evaluated split
ABSENT = "absent"
ABSENT_MARK = "(absent)"


def _absent(metrics: dict[str, Any], name: str) -> bool:
    """Whether class ``name`` had no image in this evaluation (``present`` false, or support 0
    in a summary written before ``present`` existed); unknown classes are not absent."""
    entry = metrics.get("per_class", {}).get(name)
    if not isinstance(entry, dict):
        return False
    return entry.get("present") is False or entry.get("support") == 0


def _macro_over(metrics: dict[str, Any], names: Sequence[str]) -> str:
    """``2/3``: the classes the macro averages ran over, of all; ``-`` for a result without
    ``macro_over`` (written before it existed, when the macros ran over true or predicted classes)."""
    if "macro_over" not in metrics:
        return "-"
    return f"{len(metrics['macro_over'])}/{len(names)}"


def _class_names(results: dict[str, dict[str, Any]]) -> list[str]:
    for m in results.values():
        if m.get("per_class"):
            return list(m["per_class"])
    return []
