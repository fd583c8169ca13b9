"""Bad inputs: each is one clear line, the right exit code, no traceback, nothing written."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from helpers_data import breakhis_root, run_cli

from cdft_core.data.splits import load_splits, prepare
from cdft_core.errors import CdftError, UsageError


@pytest.fixture(scope="module")
def breakhis(tmp_path_factory) -> str:
    return breakhis_root(tmp_path_factory)


@pytest.fixture(scope="module")
def split(breakhis, tmp_path_factory) -> tuple[str, pd.DataFrame]:
    """A good BreakHis split file (paper task, 200X, patient folds) and its table."""
    table = prepare("breakhis", breakhis, decode_check=1)
    path = tmp_path_factory.mktemp("split") / "split.csv"
    table.to_csv(path, index=False)
    return str(path), table


@pytest.fixture
def tiles(tmp_path, breakhis) -> Path:
    """A csv-dataset root with three good images and labels.csv (edited by the tests)."""
    root = tmp_path / "tiles"
    (root / "img").mkdir(parents=True)
    sources = sorted(Path(breakhis).rglob("*-200-001.png"))[:3]
    for i, source in enumerate(sources):
        shutil.copy(source, root / "img" / f"t{i}.png")
    pd.DataFrame({"image_path": [f"img/t{i}.png" for i in range(3)], "label": [0, 1, 0]}).to_csv(
        root / "labels.csv", index=False
    )
    return root


def one_error(err: str) -> str:
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("cdft: error:")]
    assert len(errors) == 1, err
    return errors[0]


def write(table: pd.DataFrame, path: Path) -> str:
    table.to_csv(path, index=False)
    return str(path)


# -- through `cdft prepare`: exit codes as the user sees them -------------------------------


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["breakhis", "{missing}"], 2, r"data root '.*nowhere' does not exist"),
        (["breakhis", "{empty}"], 1, r"no BreakHis images \(SOB_.*\) under .*empty; pass the BreaKHis_v1 folder"),
        (["breakhis", "{breakhis}", "--task", "grading"], 2,
         r"invalid value 'grading' for option 'task' .*choose from: malignant-subtype, benign-malignant, subtype"),
        (["breakhis", "{breakhis}", "--magnification=300X"], 2,
         r"invalid value '300X' for option 'magnification' .*choose from: 40X, 100X, 200X, 400X, all"),
        (["breakhis", "{breakhis}", "--magnifcation", "200X"], 2,
         r"unknown option --magnifcation .*dataset options: --task, --magnification, --split; command options: --folds"),
        (["breakhis", "{breakhis}", "--task"], 2, r"option --task needs a value"),
        (["breakhis", "{breakhis}", "stray"], 2, r"unexpected argument 'stray'"),
        (["hcrf", "{breakhis}", "--task", "subtype"], 2, r"unknown option --task .*dataset options: --normal, --abnormal"),
        (["breakhis", "{breakhis}", "--folds", "40"], 2, r"--folds 40 is more than the 13 groups \(patients\) found"),
        (["breakhis", "{breakhis}", "--folds", "1"], 2, r"Invalid value for '--folds'"),
        (["nosuchset", "{breakhis}"], 2, r"unknown dataset 'nosuchset'"),
    ],
)  # fmt: skip
def test_prepare_errors(capsys, tmp_path, breakhis, args, code, message):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.png").write_bytes(b"not a breakhis file")
    paths = {"missing": str(tmp_path / "nowhere"), "empty": str(tmp_path / "empty"), "breakhis": breakhis}
    out_csv = tmp_path / "out.csv"
    got, out, err = run_cli(capsys, "prepare", *[a.format(**paths) for a in args], "-o", str(out_csv))
    assert got == code
    assert re.search(message, one_error(err)), err
    assert not out_csv.exists()
    assert list(tmp_path.glob(".out.csv*")) == []  # no temporary file left behind


@pytest.mark.parametrize(
    ("edit", "code", "message"),
    [
        (lambda t: t.drop(columns=["label"]), 2, r"--table 'labels.csv' has no column label"),
        (lambda t: t.assign(label=[0, 3, 0]), 2, r"image 'img/t1.png': label 3 is outside the 2 classes \(0..1: a, b\)"),
        (lambda t: t.assign(label=["0", "x", "1"]), 2, r"label 'x' is not an integer"),
        (lambda t: t.assign(image_path=["img/t0.png", "img/gone.png", "img/t2.png"]), 1,
         r"error: image 'img/gone.png' not found under data root .*tiles; check the root or the split file"),
        (lambda t: t.assign(image_path=["img/t0.png", "../outside.png", "img/t2.png"]), 2,
         r"image_path '../outside.png' escapes the data root with '..'"),
        (lambda t: t.assign(image_path=["img/t0.png", "/etc/hostname", "img/t2.png"]), 2,
         r"image_path '/etc/hostname' is an absolute path outside the data root"),
        (lambda t: t.assign(image_path=["img/t0.png", "img/bad.png", "img/t2.png"]), 1,
         r"error: cannot decode image 'img/bad.png' \(.*\); replace or remove the file"),
        (lambda t: t.assign(image_path=["img/t0.png", "img/text.png", "img/t2.png"]), 1,
         r"error: cannot decode image 'img/text.png' \(not an image format Pillow reads\); replace or remove"),
    ],
)  # fmt: skip
def test_prepare_csv_errors(capsys, tiles, edit, code, message):
    (tiles / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tiles / "img" / "text.png").write_text("not an image at all\n")
    table = pd.read_csv(tiles / "labels.csv")
    edit(table).to_csv(tiles / "labels.csv", index=False)
    out_csv = tiles / "split.csv"
    out_csv.write_text("previous content\n")
    got, out, err = run_cli(
        capsys, "prepare", "csv", str(tiles), "--classes", "a,b", "--folds", "2", "-o", str(out_csv)
    )
    assert got == code
    line = one_error(err)
    assert re.search(message, line), err
    assert line.count("'img/") + line.count("'../") + line.count("'/etc") <= 1, line  # a file is named once
    assert "object at 0x" not in line
    assert out_csv.read_text() == "previous content\n"  # a failed prepare never touches the output


def test_prepare_csv_without_its_table(capsys, tiles):
    (tiles / "labels.csv").unlink()
    got, _, err = run_cli(capsys, "prepare", "csv", str(tiles), "-o", str(tiles / "split.csv"))
    assert got == 2
    line = one_error(err)
    assert re.search(r"--table file '.*tiles/labels.csv' does not exist; write that CSV \(image_path,label", line), line
    assert "cdft prepare" not in line  # prepare is what reads it: no advice to run prepare


def test_absolute_paths_inside_the_root_are_accepted(capsys, tiles):
    table = pd.read_csv(tiles / "labels.csv")
    table["image_path"] = [str(tiles / p) for p in table["image_path"]]
    table.to_csv(tiles / "labels.csv", index=False)
    got, _, err = run_cli(capsys, "prepare", "csv", str(tiles), "--folds", "2", "-o", str(tiles / "split.csv"))
    assert got == 0, err
    assert pd.read_csv(tiles / "split.csv")["image_path"].tolist() == ["img/t0.png", "img/t1.png", "img/t2.png"]


# -- split files given to load_splits (what `cdft run` calls) ----------------------------------


@pytest.mark.parametrize(
    ("edit", "kwargs", "error", "message"),
    [
        (lambda t: t.drop(columns=["fold"]), {}, UsageError,
         r"split file .*has no column fold \(columns: image_path, label, class_name.*\); a split file needs image_path,label,fold"),
        (lambda t: t.assign(label=t["label"].where(t.index != 4, 4)), {}, UsageError,
         r"split file .* line 6: label 4 is outside the 4 classes \(0..3: DC, LC, MC, PC\)"),
        (lambda t: t, {"val_fold": 9}, UsageError, r"--val-fold 9 does not exist; the split has folds 0, 1, 2, 3, 4"),
        (lambda t: t, {"test_fold": 0}, UsageError, r"--val-fold and --test-fold are both 0"),
        (lambda t: t.assign(fold=t["fold"].replace(4, 1)), {"test_fold": 4}, UsageError,
         r"--test-fold 4 does not exist; the split has folds 0, 1, 2, 3"),
        (lambda t: t.assign(image_path=t["image_path"].str.replace("-001.png", "-009.png")), {}, CdftError,
         r"line 2: image '.*-009.png' not found under data root .*\(and \d+ more missing\)"),
        (lambda t: t.assign(image_path=t["image_path"].where(t.index != 0, "../../etc/passwd")), {}, UsageError,
         r"line 2: image_path '../../etc/passwd' escapes the data root"),
        (lambda t: t.assign(class_name=t["class_name"].where(t.index != 2, "PC")), {}, UsageError,
         r"line 4: class_name 'PC' does not match label 0 = 'DC'; use the dataset options the file was prepared with"),
        (lambda t: t, {"options": {"task": "benign-malignant"}}, UsageError,
         r"split file .* was made with task=malignant-subtype, but this run asks for task=benign-malignant"),
        # a file without the recorded options (the paper's, an older cdft's): the label check still catches it
        (lambda t: t.loc[:, ~t.columns.str.startswith("cdft_")], {"options": {"task": "benign-malignant"}},
         UsageError, r"line \d+: label [23] is outside the 2 classes"),
        (lambda t: t, {"protocol": "low-datta"}, UsageError, r"unknown protocol 'low-datta'.*choose from: standard, low-data"),
    ],
)  # fmt: skip
def test_split_file_errors(split, tmp_path, breakhis, edit, kwargs, error, message):
    path, table = split
    bad = write(edit(table.copy()), tmp_path / "bad.csv")
    arguments = {"split_file": bad, "val_fold": 0, "test_fold": 1, **kwargs}
    with pytest.raises(error) as raised:
        load_splits("breakhis", breakhis, **arguments)
    assert type(raised.value) is error  # UsageError exits 2, CdftError 1
    assert "\n" not in str(raised.value)
    assert re.search(message, str(raised.value)), str(raised.value)


def test_split_file_that_is_missing_or_not_csv(breakhis, tmp_path):
    with pytest.raises(UsageError, match=r"split file '.*absent.csv' does not exist; make one with `cdft prepare`"):
        load_splits("breakhis", breakhis, split_file=str(tmp_path / "absent.csv"), val_fold=0, test_fold=1)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(UsageError, match=r"split file '.*empty.csv' is not a readable CSV"):
        load_splits("breakhis", breakhis, split_file=str(tmp_path / "empty.csv"), val_fold=0, test_fold=1)


def test_good_split_file_loads(split, breakhis):
    path, table = split
    splits = load_splits("breakhis", breakhis, split_file=path, val_fold=0, test_fold=1)
    assert len(splits.train) + len(splits.val) + len(splits.test) == len(table)
    assert splits.options == {"task": "malignant-subtype", "magnification": "200X", "split": "patient"}
