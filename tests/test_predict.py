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


def test_an_fp16_run_predicts_on_cpu_in_fp32(run, tmp_path):
    from cdft_core.inference.inputs import collect_inputs
    from cdft_core.inference.model_loading import inference_precision, load_trained
    from cdft_core.inference.predict import predict_images

    assert inference_precision("fp16", "cpu") == "fp32"
    assert inference_precision("fp16", "cuda:0") == "fp16"
    assert inference_precision(None, "cpu") == "fp32"
    picture = tmp_path / "a.png"
    _image(picture)
    model, classes, data_config, metadata = load_trained(str(run), "cpu")
    metadata = dict(metadata, cdft_config=dict(metadata.get("cdft_config") or {}, precision="fp16"))
    table = predict_images(model, classes, data_config, collect_inputs([str(picture)]), metadata=metadata)
    assert table.failed == 0


def _image(path: Path) -> None:
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(path)


def test_an_existing_file_with_glob_characters_is_that_file(tmp_path):
    from cdft_core.inference.inputs import collect_inputs

    picture = tmp_path / "tile[1]*?.png"
    _image(picture)
    assert [i.path for i in collect_inputs([str(picture)])] == [str(picture)]
    assert len(collect_inputs([str(tmp_path / "tile*.png")])) == 1  # a pattern still globs


def test_an_unwritable_output_fails_before_any_compute(run, tmp_path, monkeypatch):
    import cdft_core.inference.model_loading as loading

    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_trained", refuse)
    picture = tmp_path / "a.png"
    _image(picture)
    for output in (tmp_path / "missing" / "p.csv", tmp_path):
        code, _, err = invoke("predict", str(run), str(picture), "-o", str(output), "--device", "cpu")
        assert code == 2 and "cannot write" in err and len(err.strip().splitlines()) == 1, err
        code, _, err = invoke("embed", str(run), str(picture), "-o", str(output), "--device", "cpu")
        assert code == 2 and "cannot write" in err and len(err.strip().splitlines()) == 1, err


def test_a_folder_that_takes_no_new_file_is_refused_before_any_work(run, tmp_path, monkeypatch):
    """A read-only mount, an immutable folder or /proc: permission bits do not tell (and say
    yes to root), so each command tries to create a file there first, in a second."""
    import tempfile

    import cdft_core.inference.model_loading as loading

    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and str(dir).startswith(str(locked)):
            raise OSError(30, "Read-only file system")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(loading, "load_trained", lambda *a, **k: pytest.fail("the model was loaded"))
    picture = tmp_path / "a.png"
    _image(picture)
    commands = [("predict", str(run), str(picture), "-o", str(locked / "p.csv")),
                ("embed", str(run), str(picture), "-o", str(locked / "e.safetensors")),
                ("export", str(run), "-o", str(locked / "m.onnx")),
                ("prepare", "imagefolder", str(tmp_path), "-o", str(locked / "s.csv")),
                ("make-synthetic", "hcrf", str(locked / "syn"))]
    for command in commands:
        code, _, err = invoke(*command)
        assert code == 2 and len(err.strip().splitlines()) == 1, (command, err)
        assert f"{str(locked)!r} does not allow writing (Read-only file system)" in err, (command, err)
    assert list(locked.iterdir()) == []


def test_stage_folders_are_parsed_defensively_and_an_incomplete_run_warns(run, tmp_path):
    import shutil

    from cdft_core.training.evaluation import find_checkpoint

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "summary.json").unlink()
    (copy / "stage_x").mkdir()
    (copy / "stage_x" / "best.safetensors").write_bytes(b"")
    found = find_checkpoint(str(copy))
    assert "stage_x" not in found and found.endswith("best.safetensors")
    picture = tmp_path / "a.png"
    _image(picture)
    code, _, err = invoke("predict", str(copy), str(picture), "-o", str(tmp_path / "p.csv"), "--device", "cpu",
                          "--num-workers", "0")
    assert code == 0, err
    assert sum("incomplete run" in line for line in err.splitlines()) == 1
