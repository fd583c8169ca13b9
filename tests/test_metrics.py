"""Metrics on known predictions: the paper's F1 (2PR/(P+R) of macro P and R) next to macro-F1."""

from __future__ import annotations

import numpy as np
import pytest

from cdft_core.training.metrics import compute_metrics, confusion_csv, format_confusion, format_table, paper_f1, scalars


def _probs(predicted, k):
    out = np.full((len(predicted), k), 0.1 / (k - 1))
    out[np.arange(len(predicted)), predicted] = 0.9
    return out


def test_three_classes_by_hand():
    labels = [0, 0, 0, 0, 1, 1, 2, 2]
    predicted = [0, 0, 0, 1, 1, 0, 2, 1]
    m = compute_metrics(labels, _probs(predicted, 3), ["a", "b", "c"])
    # per class: a P=3/4 R=3/4; b P=1/3 R=1/2; c P=1 R=1/2
    p = (3 / 4 + 1 / 3 + 1) / 3
    r = (3 / 4 + 1 / 2 + 1 / 2) / 3
    f1s = [3 / 4, 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2), 2 * 1 * 0.5 / 1.5]
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["precision_macro"] == pytest.approx(p)
    assert m["recall_macro"] == pytest.approx(r)
    assert m["f1_macro"] == pytest.approx(sum(f1s) / 3)
    assert m["f1_paper"] == pytest.approx(2 * p * r / (p + r))
    assert m["f1_paper"] != pytest.approx(m["f1_macro"])  # not the same figure
    assert m["per_class"]["b"] == {"precision": pytest.approx(1 / 3), "recall": pytest.approx(0.5), "support": 2}
    assert m["confusion_matrix"] == [[3, 1, 0], [1, 1, 0], [0, 1, 1]]
    assert "roc_auc" not in m and m["n"] == 8


def test_two_classes_have_roc_auc():
    labels = [0, 0, 1, 1]
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.35, 0.65], [0.2, 0.8]])
    m = compute_metrics(labels, probs, ["normal", "abnormal"])
    assert m["roc_auc"] == pytest.approx(1.0)  # ranking is perfect although one prediction is wrong
    assert m["accuracy"] == pytest.approx(0.75)
    only_one = compute_metrics([1, 1], probs[:2], ["normal", "abnormal"])
    assert "roc_auc" not in only_one  # undefined with a single class present


def test_shapes_are_checked():
    with pytest.raises(ValueError):
        compute_metrics([0, 1], np.zeros((3, 2)), ["a", "b"])
    with pytest.raises(ValueError):
        compute_metrics([0, 1], np.zeros((2, 3)), ["a", "b"])


def test_paper_f1_edge_cases():
    assert paper_f1(0.0, 0.0) == 0.0
    assert paper_f1(0.5, 1.0) == pytest.approx(2 / 3)


def test_tables_and_csv():
    m = compute_metrics([0, 1, 1], _probs([0, 1, 0], 2), ["normal", "abnormal"])
    text = format_table({"val": m, "test": m}, ["normal", "abnormal"])
    assert text.splitlines()[0].split() == ["metric", "val", "test"]
    assert "f1_paper" in text and "recall[abnormal]" in text and "0.6667" in text
    assert format_confusion(m["confusion_matrix"], ["normal", "abnormal"]).splitlines()[-1].split() == ["abnormal", "1", "1"]
    assert confusion_csv(m["confusion_matrix"], ["normal", "abnormal"]) == "true\\pred,normal,abnormal\nnormal,1,0\nabnormal,1,1\n"
    assert set(scalars(m)) == {"accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_paper", "roc_auc"}
