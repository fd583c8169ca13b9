"""Per-image predictions and patient-level metrics: the figures on hand-made prediction
tables with known answers (a patient with mixed labels, a tie, images without a patient),
and the ``predictions.csv`` each stage of a real run writes."""

from __future__ import annotations

import csv
import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers_engine import engine_data, invoke, quick_args, read_json, staged_run

from cdft_core.data.splits import Splits, group_text
from cdft_core.training.evaluation import Predictions, metrics_of
from cdft_core.training.metrics import compute_metrics, format_table, patient_metrics, scalars
from cdft_core.training.predictions import predictions_csv

CLASSES = ["a", "b", "c"]
# patient, label, probabilities (a, b, c)
TABLE = [
    ("A", 0, (0.90, 0.05, 0.05)),  # right
    ("A", 0, (0.60, 0.30, 0.10)),  # right
    ("A", 0, (0.20, 0.70, 0.10)),  # wrong: A 2/3; mean (0.567, 0.35, 0.083) -> a: patient right
    ("B", 1, (0.10, 0.30, 0.60)),  # wrong
    ("B", 1, (0.10, 0.40, 0.50)),  # wrong
    ("B", 2, (0.10, 0.50, 0.40)),  # wrong: B 0/3; labels b, b, c -> b; mean (0.1, 0.4, 0.5) -> c: wrong
    ("C", 0, (0.70, 0.10, 0.20)),  # right
    ("C", 2, (0.10, 0.10, 0.80)),  # right: C 2/2; labels a, c tie -> a (smallest); mean (0.4, 0.1, 0.5) -> c: wrong
    ("D", 1, (0.20, 0.80, 0.00)),  # right: D 1/1, right
    ("", 0, (0.00, 1.00, 0.00)),  # no patient: counts for images only
]


def _table() -> tuple[list[str], np.ndarray, np.ndarray]:
    groups = [g for g, _, _ in TABLE]
    return groups, np.array([y for _, y, _ in TABLE]), np.array([p for _, _, p in TABLE])


def test_patient_figures_of_a_hand_made_table():
    groups, labels, probs = _table()
    got = patient_metrics(labels, probs, groups)
    assert got["patient_recognition_rate"] == pytest.approx((2 / 3 + 0 + 1 + 1) / 4)
    assert got["patient_accuracy"] == pytest.approx(2 / 4)  # A and D; B (majority b) and C (tie -> a) wrong
    # the image-level figure weighs images, not patients, and counts the image without a patient
    assert compute_metrics(labels, probs, CLASSES)["accuracy"] == pytest.approx(5 / 10)


def test_a_label_tie_goes_to_the_smallest_index_and_so_does_a_probability_tie():
    # one patient, labels b and c (a tie: b), mean probabilities (0, 0.5, 0.5) (a tie: b)
    got = patient_metrics([1, 2], np.array([[0.0, 0.5, 0.5], [0.0, 0.5, 0.5]]), ["p", "p"])
    assert got == {"patient_recognition_rate": 0.5, "patient_accuracy": 1.0}
    # the mean of probabilities decides, not a vote of the images' predictions
    voted = patient_metrics([0, 0, 0], np.array([[0.4, 0.6, 0], [0.4, 0.6, 0], [1.0, 0, 0]]), ["p"] * 3)
    assert voted == {"patient_recognition_rate": pytest.approx(1 / 3), "patient_accuracy": 1.0}


def test_patient_keys_only_where_images_have_patients():
    groups, labels, probs = _table()
    for none in (None, [""] * len(labels)):
        m = compute_metrics(labels, probs, CLASSES, none)
        assert "patient_recognition_rate" not in m and "patient_accuracy" not in m
    m = compute_metrics(labels, probs, CLASSES, groups)
    assert m["patient_accuracy"] == pytest.approx(0.5) and isinstance(m["patient_recognition_rate"], float)
    assert {"patient_recognition_rate", "patient_accuracy"} <= set(scalars(m))  # TensorBoard, hparams, cv
    table = format_table({"test": m, "old": compute_metrics(labels, probs, CLASSES)}, CLASSES)
    row = next(line for line in table.splitlines() if line.startswith("patient_accuracy"))
    assert row.split()[1:] == ["0.5000", "-"]
    assert compute_metrics([], np.zeros((0, 3)), CLASSES, [])["n"] == 0
    with pytest.raises(ValueError, match="groups"):
        patient_metrics(labels, probs, groups[:-1])


def test_group_text_and_split_groups():
    assert [group_text(v) for v in ("22549", 22549, 22549.0, float("nan"), None, " x ")] == \
        ["22549", "22549", "22549", "", "", "x"]
    table = pd.DataFrame({"image_path": ["a.png", "b.png"], "label": [0, 1], "patient": [7.0, float("nan")]})
    splits = Splits(["a", "b"], "/r", "standard", table, table, table.drop(columns="patient"), group_column="patient")
    assert splits.groups("val") == ["7", ""]
    assert splits.groups("test") is None  # no column
    assert Splits(["a", "b"], "/r", "standard", table, table, table).groups("val") is None  # no group column
    empty = table.assign(patient=[float("nan")] * 2)
    assert Splits(["a", "b"], "/r", "standard", empty, empty, empty, group_column="patient").groups("val") is None


def test_predictions_csv_columns_and_rows():
    groups, labels, probs = _table()
    logits = torch.log(torch.tensor(probs, dtype=torch.float32).clamp_min(1e-12))
    predictions = Predictions(torch.tensor(labels), logits)
    paths = [f"p/{i},x.png" for i in range(len(labels))]  # a comma: quoted
    text = predictions_csv(["a", "b", "c, d"], [("val", paths[:2], None, Predictions(predictions.labels[:2],
                                                                                  logits[:2])),
                                                ("test", paths, groups, predictions)])
    rows = list(csv.DictReader(text.splitlines()))
    assert list(rows[0]) == ["split", "image_path", "group", "label", "label_name", "predicted", "predicted_name",
                             "prob_a", "prob_b", "prob_c, d"]
    assert [r["split"] for r in rows] == ["val"] * 2 + ["test"] * len(labels)
    assert rows[0]["group"] == "" and rows[2]["group"] == "A" and rows[2]["image_path"] == "p/0,x.png"
    assert rows[5]["label"] == "1" and rows[5]["predicted"] == "2" and rows[5]["predicted_name"] == "c, d"
    test = rows[2:]
    read = np.array([[float(r[f"prob_{c}"]) for c in ("a", "b", "c, d")] for r in test])
    assert np.array_equal(read, predictions.probabilities().astype(np.float64))  # every digit written
    assert metrics_of(predictions, CLASSES, groups)["patient_accuracy"] == pytest.approx(0.5)
    with pytest.raises(Exception, match="predictions for"):
        predictions_csv(CLASSES, [("test", paths[:3], None, predictions)])


# -- a real run --------------------------------------------------------------------------
def _read(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"group": str, "image_path": str}, keep_default_na=False)


def _split_table(root: str, split: str, name: str) -> pd.DataFrame:
    from cdft_core.data.splits import load_splits

    return getattr(load_splits("breakhis", root, split_file=split, val_fold=1, test_fold=3), name)


@pytest.mark.slow
def test_each_stage_writes_the_predictions_of_its_best_weights(tmp_path_factory):
    from cdft_core.training.evaluation import evaluate_checkpoint

    run_dir = staged_run(tmp_path_factory)
    root, split = engine_data(tmp_path_factory)
    summary = read_json(run_dir / "summary.json")
    classes = summary["classes"]
    assert "patient_accuracy" in summary["test"] and "patient_recognition_rate" in summary["val"]
    for stage in summary["stages"]:
        directory = run_dir / stage["checkpoint"].rsplit("/", 1)[0]
        frame = _read(directory / "predictions.csv")
        assert list(frame.columns) == ["split", "image_path", "group", "label", "label_name", "predicted",
                                       "predicted_name", *(f"prob_{c}" for c in classes)]
        probs = frame[[f"prob_{c}" for c in classes]].to_numpy()
        assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-6)
        assert (probs.argmax(axis=1) == frame["predicted"]).all()
        assert (frame["label_name"] == [classes[i] for i in frame["label"]]).all()
        assert (frame["predicted_name"] == [classes[i] for i in frame["predicted"]]).all()
        for name in ("val", "test"):
            rows = frame[frame["split"] == name]
            table = _split_table(root, split, name)
            assert len(rows) == summary["images"][name] == len(table)
            assert rows["image_path"].tolist() == table["image_path"].tolist()
            assert rows["group"].tolist() == [str(p) for p in table["patient"]]
            assert rows["label"].tolist() == table["label"].tolist()
            expected = stage[name]
            assert (rows["predicted"] == rows["label"]).mean() == pytest.approx(expected["accuracy"], abs=1e-12)
            again = patient_metrics(rows["label"].to_numpy(), rows[[f"prob_{c}" for c in classes]].to_numpy(),
                                    rows["group"].tolist())
            assert again == pytest.approx({k: expected[k] for k in again}, abs=1e-6)
            # what `cdft eval` of the stage's checkpoint predicts, image by image
            checked = evaluate_checkpoint(str(run_dir / stage["checkpoint"]), split=name, device="cpu")
            assert checked.predictions.probabilities().argmax(1).tolist() == rows["predicted"].tolist()
            assert np.allclose(checked.predictions.probabilities(), rows[[f"prob_{c}" for c in classes]], atol=1e-6)
            assert checked.metrics["patient_accuracy"] == expected["patient_accuracy"]


@pytest.mark.slow
def test_a_dataset_without_patients_has_an_empty_group_and_no_patient_metrics(tmp_path_factory, tmp_path):
    root, split = engine_data(tmp_path_factory)
    plain = tmp_path / "plain.csv"
    pd.read_csv(split)[["image_path", "label", "fold", "class_name"]].to_csv(plain, index=False)
    args = quick_args(root, str(plain), strategy="linear", epochs=1)
    args[args.index("breakhis")] = "csv"
    code, out, err = invoke(*args, "--output", str(tmp_path / "run"))
    assert code == 0, err
    summary = read_json(tmp_path / "run" / "summary.json")
    assert not {"patient_accuracy", "patient_recognition_rate"} & (set(summary["test"]) | set(summary["val"]))
    assert "patient_accuracy" not in out
    frame = _read(tmp_path / "run" / "stage1-linear" / "predictions.csv")
    assert (frame["group"] == "").all() and len(frame) == summary["images"]["val"] + summary["images"]["test"]
    test = frame[frame["split"] == "test"]
    assert math.isclose((test["predicted"] == test["label"]).mean(), summary["test"]["accuracy"], abs_tol=1e-12)
