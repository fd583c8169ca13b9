"""Metrics on known predictions: the paper's F1 (2PR/(P+R) of macro P and R) next to macro-F1."""

from __future__ import annotations

import json

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
    assert m["per_class"]["b"] == {
        "present": True, "precision": pytest.approx(1 / 3), "recall": pytest.approx(0.5), "f1": pytest.approx(f1s[1]),
        "support": 2,
    }
    assert m["macro_over"] == ["a", "b", "c"]
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


ABSENT_CLASS = {"present": False, "precision": None, "recall": None, "f1": None, "support": 0}


def test_macro_runs_over_the_classes_of_the_true_labels_only():
    # class c has no image in this split; the two runs differ only in one image of a,
    # predicted as the absent c in one and as b in the other
    labels = [0, 0, 0, 0, 1, 1]
    to_absent = compute_metrics(labels, _probs([0, 0, 0, 2, 1, 1], 3), ["a", "b", "c"])
    to_present = compute_metrics(labels, _probs([0, 0, 0, 1, 1, 1], 3), ["a", "b", "c"])
    for m in (to_absent, to_present):
        assert m["macro_over"] == ["a", "b"]
        assert m["recall_macro"] == pytest.approx((3 / 4 + 1) / 2)  # not (3/4 + 1 + 0)/3
        assert m["per_class"]["c"] == ABSENT_CLASS
        assert m["f1_paper"] == pytest.approx(paper_f1(m["precision_macro"], m["recall_macro"]))
    assert to_absent["recall_macro"] == to_present["recall_macro"]
    # precision over {a, b} only: the image sent to c costs a's recall, never a c term
    assert to_absent["precision_macro"] == pytest.approx(1.0)
    assert to_present["precision_macro"] == pytest.approx((1 + 2 / 3) / 2)
    assert to_absent["f1_macro"] == pytest.approx((2 * 0.75 / 1.75 + 1) / 2)
    assert to_absent["f1_paper"] == pytest.approx(2 * 1.0 * 0.875 / 1.875)
    assert to_absent["confusion_matrix"] == [[3, 0, 1], [0, 2, 0], [0, 0, 0]]
    # the same split, perfectly predicted, is 1.0 whatever else the classes list holds
    perfect = compute_metrics(labels, _probs([0, 0, 0, 0, 1, 1], 3), ["a", "b", "c"])
    assert perfect["recall_macro"] == perfect["precision_macro"] == perfect["f1_paper"] == 1.0
    json.dumps(to_absent, allow_nan=False)  # summary.json-safe: None, not NaN


def test_a_present_class_never_predicted_counts_zero_precision():
    m = compute_metrics([0, 0, 1, 1], _probs([0, 0, 0, 0], 3), ["a", "b", "c"])
    assert m["macro_over"] == ["a", "b"]
    assert m["per_class"]["b"] == {"present": True, "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert m["precision_macro"] == pytest.approx((0.5 + 0) / 2)
    assert m["recall_macro"] == pytest.approx((1 + 0) / 2)
    assert m["f1_paper"] == pytest.approx(paper_f1(0.25, 0.5))


def test_absent_classes_show_as_absent_in_the_table_and_confusion_text():
    classes = ["a", "b", "c"]
    val = compute_metrics([0, 0, 1, 1], _probs([0, 2, 1, 1], 3), classes)  # no c in val
    test = compute_metrics([0, 1, 2], _probs([0, 1, 2], 3), classes)
    rows = {line.split()[0]: line.split()[1:] for line in format_table({"val": val, "test": test}, classes).splitlines()}
    assert rows["precision[c]"] == ["absent", "1.0000"] and rows["recall[c]"] == ["absent", "1.0000"]
    assert rows["recall[a]"] == ["0.5000", "1.0000"]
    assert rows["macro"] == ["over", "2/3", "3/3"]
    # no absent class anywhere: no "macro over" row, the table as before
    assert "macro over" not in format_table({"test": test}, classes)
    lines = format_confusion(val["confusion_matrix"], classes).splitlines()
    assert lines[0].split() == ["true", "\\", "pred", "a", "b", "c"]
    assert lines[2].split() == ["a", "1", "0", "1"]  # the wrong prediction into c still shows in c's column
    assert lines[4].split() == ["c", "(absent)", "-", "-", "-"]
    assert confusion_csv(val["confusion_matrix"], classes).splitlines()[-1] == "c,0,0,0"
    assert "(absent)" not in format_confusion(test["confusion_matrix"], classes)


def test_no_images_at_all():
    m = compute_metrics([], np.zeros((0, 2)), ["normal", "abnormal"])
    assert m["n"] == 0 and m["macro_over"] == [] and m["f1_paper"] == 0.0
    assert m["per_class"]["normal"] == ABSENT_CLASS and m["confusion_matrix"] == [[0, 0], [0, 0]]
    with pytest.raises(ValueError, match="labels must lie in"):
        compute_metrics([0, 3], np.zeros((2, 2)), ["normal", "abnormal"])
