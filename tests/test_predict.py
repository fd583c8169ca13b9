"""``cdft predict`` on a tiny trained run: folders and CSV lists, agreement with ``cdft eval``
and the run's predictions.csv, grouping by patient, and unreadable images counted."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from helpers_engine import engine_data, invoke, read_json, staged_run

PATIENT = r"SOB_[BM]_[A-Z]+-\d+-(\d+)"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return staged_run(tmp_path_factory)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return engine_data(tmp_path_factory)


@pytest.fixture(scope="module")
def test_split(run, data):
    """The run's own predictions of its test split (stage of the final checkpoint) and the classes."""
    checkpoint = read_json(run / "summary.json")["checkpoint"]
    stage = Path(checkpoint).parent
    rows = [r for r in _rows(run / stage / "predictions.csv") if r["split"] == "test"]
    assert rows
    classes = [c[len("prob_"):] for c in rows[0] if c.startswith("prob_")]
    return rows, classes


def test_predict_csv_equals_the_runs_predictions_and_cdft_eval(run, data, test_split, tmp_path):
    from cdft_core.training.evaluation import evaluate_checkpoint

    root, _ = data
    rows, classes = test_split
    listing = tmp_path / "list.csv"
    with open(listing, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_path", "patient"])
        for row in rows:
            writer.writerow([str(Path(root) / row["image_path"]), row["group"]])
    out = tmp_path / "p.csv"
    code, stdout, err = invoke("predict", str(run), str(listing), "-o", str(out), "--num-workers", "0",
                               "--device", "cpu", "--batch-size", "4")
    assert code == 0, err
    assert stdout.strip().splitlines()[-1] == f"{len(rows)} images, 0 could not be read (listed in {out})"
    got = _rows(out)
    assert len(got) == len(rows)
    evaluation = evaluate_checkpoint(str(run), device="cpu")
    expected = evaluation.predictions.probabilities()
    for i, (mine, theirs) in enumerate(zip(got, rows, strict=True)):
        probs = [float(mine[f"prob_{c}"]) for c in classes]
        assert math.isclose(sum(probs), 1.0, abs_tol=1e-5)
        assert mine["error"] == ""
        assert mine["predicted"] == classes[max(range(len(probs)), key=probs.__getitem__)]
        for k, c in enumerate(classes):
            assert abs(probs[k] - float(theirs[f"prob_{c}"])) < 1e-5
            assert abs(probs[k] - float(expected[i, k])) < 1e-5

    groups_out = tmp_path / "g.csv"
    code, _, err = invoke("predict", str(run), str(listing), "-o", str(groups_out), "--num-workers", "0",
                          "--device", "cpu", "--group-by", "column:patient")
    assert code == 0, err
    groups = _rows(tmp_path / "g-groups.csv")
    assert {g["group"] for g in groups} == {r["group"] for r in rows}
    assert sum(int(g["images"]) for g in groups) == len(rows)


def test_predict_a_folder_groups_by_patient_and_counts_a_corrupt_image(run, data, tmp_path):
    import shutil

    root, _ = data
    images = sorted(Path(root).rglob("*.png"))[:6]
    folder = tmp_path / "images" / "nested"
    folder.mkdir(parents=True)
    for image in images:
        shutil.copy(image, folder / image.name)
    (folder / "SOB_B_A-14-99999-200-001.png").write_bytes(b"not an image")
    out = tmp_path / "out.csv"
    code, stdout, err = invoke("predict", str(run), str(tmp_path / "images"), "-o", str(out), "--num-workers", "0",
                               "--device", "cpu", "--group-by", PATIENT, "--tta", "flip")
    assert code == 0, err
    assert stdout.strip().splitlines()[-1].startswith(f"{len(images) + 1} images, 1 could not be read (listed in {out})")
    got = _rows(out)
    assert len(got) == len(images) + 1
    bad = [r for r in got if r["error"]]
    assert len(bad) == 1 and bad[0]["path"].endswith("99999-200-001.png") and bad[0]["predicted"] == ""
    for row in got:
        if not row["error"]:
            assert math.isclose(sum(float(v) for k, v in row.items() if k.startswith("prob_")), 1.0, abs_tol=1e-5)
    groups = _rows(tmp_path / "out-groups.csv")
    by_name = {g["group"]: g for g in groups}
    assert by_name["99999"]["images"] == "0"
    patients = {r["group"] for r in got if not r["error"]}
    assert sum(int(by_name[p]["images"]) for p in patients) == len(images)

    code, stdout, err = invoke("predict", str(run), str(folder), "--json", "--num-workers", "0", "--device", "cpu")
    assert code == 0, err
    document = json.loads(stdout)
    assert len(document["predictions"]) == len(images) + 1 and document["errors"] == 1


def test_no_readable_image_exits_1_and_usage_errors_exit_2(run, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"")
    code, stdout, _ = invoke("predict", str(run), str(tmp_path / "bad.png"), "-o", str(tmp_path / "o.csv"),
                             "--num-workers", "0", "--device", "cpu")
    assert code == 1 and "1 images, 1 could not be read" in stdout.strip().splitlines()[-1]
    code, _, err = invoke("predict", str(run), str(tmp_path / "missing"), "-o", str(tmp_path / "o.csv"))
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
