"""Split integrity: the folds a split file or ``cdft prepare`` gives must mean what they say.

- rows without a group (an empty ``group`` cell) are refused, not pooled into one group "nan";
- an HCRF class folder without an image (a misspelt ``--normal``) is refused, not a one-class split;
- a split file recording ``--split patient`` with a patient in several folds is refused at load time.

No training: the checks run before any model is built.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers_engine import invoke

from cdft_core import IMAGE_EXTENSIONS
from cdft_core.errors import UsageError


@pytest.fixture(scope="module")
def hcrf_root(tmp_path_factory) -> str:
    from cdft_core.data.synthetic import make_synthetic_hcrf

    return make_synthetic_hcrf(str(tmp_path_factory.mktemp("integrity-hcrf")), seed=0)


@pytest.fixture(scope="module")
def breakhis(tmp_path_factory) -> tuple[str, Path]:
    """(root, folder) of a small synthetic BreakHis tree with a patient-level and an image-level split file."""
    from cdft_core.data.splits import prepare
    from cdft_core.data.synthetic import make_synthetic_breakhis
    from cdft_core.data.tables import write_split_file

    base = tmp_path_factory.mktemp("integrity-breakhis")
    root = make_synthetic_breakhis(str(base), seed=0, images_per_magnification=2)
    for rule in ("patient", "image"):
        write_split_file(prepare("breakhis", root, options={"split": rule}, decode_check=1), str(base / f"{rule}.csv"))
    return root, base


def _labels_csv(hcrf_root: str, path: Path, group_of) -> str:
    """A ``csv`` dataset table over the HCRF images; ``group_of(i)`` is row i's group cell ("" = empty)."""
    images = sorted(p.relative_to(hcrf_root).as_posix() for p in Path(hcrf_root).rglob("*")
                    if p.is_file() and "mask" not in p.as_posix().lower() and "_GT" not in p.name)
    lines = ["image_path,label,group"]
    for i, image in enumerate(images):
        lines.append(f"{image},{0 if '/Normal/' in f'/{image}' else 1},{group_of(i)}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_rows_without_a_group_are_refused_naming_count_path_and_fix(hcrf_root, tmp_path):
    table = _labels_csv(hcrf_root, tmp_path / "labels.csv", lambda i: "" if i % 3 == 0 else f"p{i % 5}")
    code, _, err = invoke("prepare", "csv", hcrf_root, "--table", table, "--folds", "2", "-o", str(tmp_path / "o.csv"))
    assert code == 2, err
    message = err.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("cdft: error: 7 of 20 rows have no group (e.g. 'Abnormal/")
    assert "fill in the group column" in message[0] and "without grouping" in message[0]
    assert not (tmp_path / "o.csv").exists()


def test_an_empty_group_column_is_refused_not_counted_as_one_group(hcrf_root, tmp_path):
    table = _labels_csv(hcrf_root, tmp_path / "labels.csv", lambda i: "")
    code, _, err = invoke("prepare", "csv", hcrf_root, "--table", table, "--folds", "4", "-o", str(tmp_path / "o.csv"))
    assert code == 2, err
    assert "20 of 20 rows have no group" in err and "1 groups" not in err


def test_full_groups_still_prepare(hcrf_root, tmp_path):
    table = _labels_csv(hcrf_root, tmp_path / "labels.csv", lambda i: f"p{i % 5}")
    code, out, err = invoke("prepare", "csv", hcrf_root, "--table", table, "--folds", "2", "-o", str(tmp_path / "o.csv"))
    assert code == 0, err
    assert "20 images, 5 groups" in out


@pytest.mark.parametrize(("option", "folder", "cls", "masks"), [
    ("--normal", "foo", "normal", 0),  # no such folder
    ("--normal", "masks", "normal", 6),  # a folder of masks only
    ("--abnormal", "nothing-here", "abnormal", 0),
])
def test_hcrf_class_without_images_is_a_usage_error(hcrf_root, tmp_path, option, folder, cls, masks):
    code, out, err = invoke("prepare", "hcrf", hcrf_root, option, folder, "-o", str(tmp_path / "h.csv"))
    assert code == 2, out + err
    line = err.strip()
    assert "\n" not in line and f"no {cls} image" in line and f"folder named {folder!r}" in line
    assert f"({masks} ground-truth mask(s) skipped there)" in line
    assert f"{option} NAME" in line
    assert ", ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS) in line  # bmp, webp too
    assert not (tmp_path / "h.csv").exists()


def _moved(source: Path, destination: Path, patient: int) -> tuple[str, int, int]:
    """Copy a split file with one row of ``patient`` moved to another fold: (file, old fold, new fold)."""
    import pandas as pd

    table = pd.read_csv(source, dtype=str, keep_default_na=False)
    rows = table.index[table["patient"] == str(patient)]
    old = int(table.loc[rows[0], "fold"])
    new = (old + 2) % 5
    table.loc[rows[0], "fold"] = str(new)
    table.to_csv(destination, index=False)
    return str(destination), old, new


def test_patient_split_file_with_a_patient_in_two_folds_is_refused(breakhis, tmp_path):
    from cdft_core.data.splits import load_splits

    root, base = breakhis
    load_splits("breakhis", root, split_file=str(base / "patient.csv"), val_fold=1, test_fold=3, decode_check=1)
    edited, old, new = _moved(base / "patient.csv", tmp_path / "edited.csv", 13412)
    with pytest.raises(UsageError) as raised:
        load_splits("breakhis", root, split_file=edited, val_fold=1, test_fold=3, decode_check=1)
    low, high = sorted((old, new))
    assert str(raised.value) == (
        f"split file {edited} records --split patient but 1 patient is in several folds "
        f"(e.g. 13412 in folds {low} and {high}): validation and test would share patients with training; "
        f"re-create it with `cdft prepare`"
    )
    code, _, err = invoke("run", "--dataset", "breakhis", "--data-root", root, "--split-file", edited,
                          "--val-fold", "1", "--test-fold", "3", "--backbone", "test_vit", "--no-pretrained",
                          "--image-size", "32", "--epochs", "1", "--device", "cpu", "--output", str(tmp_path / "r"))
    assert code == 2 and "records --split patient but 1 patient is in several folds" in err


def test_image_split_file_may_span_folds(breakhis):
    from cdft_core.data.splits import load_splits

    root, base = breakhis
    splits = load_splits("breakhis", root, split_file=str(base / "image.csv"), val_fold=1, test_fold=3, decode_check=1)
    assert splits.options["split"] == "image"
    whole = [splits.train, splits.val, splits.test]
    assert any(len({int(f) for t in whole for f in t[t["patient"] == p]["fold"]}) > 1 for p in splits.train["patient"])


def test_numeric_patients_stay_as_written_beside_an_empty_cell(breakhis, tmp_path):
    """A patient column of numbers with one empty cell used to be read as floats (13412.0)."""
    import pandas as pd

    from cdft_core.data.splits import load_splits

    root, base = breakhis
    edited, old, new = _moved(base / "patient.csv", tmp_path / "edited.csv", 13412)
    table = pd.read_csv(edited, dtype=str, keep_default_na=False)
    other = table.index[table["patient"] != "13412"][0]
    table.loc[other, "patient"] = ""
    table.to_csv(edited, index=False)
    with pytest.raises(UsageError) as raised:
        load_splits("breakhis", root, split_file=edited, val_fold=1, test_fold=3, decode_check=1)
    low, high = sorted((old, new))
    assert f"(e.g. 13412 in folds {low} and {high})" in str(raised.value)


def test_a_split_file_of_nul_bytes_or_beyond_the_size_bound_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    """A sparse 1 GB file of NULs took 3.7 GB and was reported as 'mixes values of cdft_dataset'."""
    import cdft_core.data.tables as tables

    nul = tmp_path / "nul.csv"
    nul.write_bytes(b"image_path,label,fold\n" + b"\x00" * 100)
    with pytest.raises(UsageError, match=r"holds NUL bytes: it is not a CSV text file"):
        tables.read_split_file(str(nul))
    monkeypatch.setattr(tables, "MAX_SPLIT_BYTES", 64)
    big = tmp_path / "big.csv"
    big.write_text("image_path,label,fold\n" + "a.png,0,0\n" * 20)
    with pytest.raises(UsageError, match=r"is over 0 MiB, far more than a split table needs"):
        tables.read_split_file(str(big))
