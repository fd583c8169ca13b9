"""`cdft prepare`, `cdft make-synthetic` and the dataset metadata `cdft list` shows."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers_data import breakhis_root, run_cli

from cdft_core.data.synthetic import CROSS_TYPE_PATIENT


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return breakhis_root(tmp_path_factory)


def digest_tree(top: Path) -> dict[str, str]:
    return {
        p.relative_to(top).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(top.rglob("*"))
        if p.is_file()
    }


def test_prepare_writes_the_csv_and_prints_the_summary(capsys, root, tmp_path):
    out_csv = tmp_path / "breakhis_200x.csv"
    args = ["prepare", "breakhis", root, "--task", "malignant-subtype", "--magnification", "200X",
            "--folds", "5", "--split", "patient", "-o", str(out_csv)]  # fmt: skip
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    table = pd.read_csv(out_csv)
    assert out_csv.read_text().splitlines()[0] == (
        "image_path,label,fold,class_name,patient,slide,type,magnification,"
        "cdft_dataset,cdft_option_task,cdft_option_magnification,cdft_option_split"
    )
    assert set(table["cdft_option_magnification"]) == {"200X"} and set(table["cdft_dataset"]) == {"breakhis"}
    assert sorted(table["fold"].unique()) == [0, 1, 2, 3, 4]
    lines = out.splitlines()
    assert lines[0].startswith(f"breakhis: {len(table)} images, 13 patients, 4 classes, 5 folds (seed 1)")
    assert "task=malignant-subtype magnification=200X split=patient" in lines[0] and str(out_csv) in lines[0]
    assert lines[1].split() == ["class", "label", "images", "patients"] + [
        w for f in range(5) for w in ("fold", str(f))
    ]
    dc = next(line for line in lines if line.startswith("DC "))
    per_fold = table[table["class_name"] == "DC"].groupby("fold").size().reindex(range(5), fill_value=0).tolist()
    assert dc.split() == ["DC", "0", "16", "4", *map(str, per_fold)]
    assert next(line for line in lines if line.startswith("patients ")).split()[1:] == [
        str(n) for n in table.groupby("fold")["patient"].nunique()
    ]
    assert lines[-1] == "leakage: none (no patient is in more than one fold)"
    assert f"cdft: warning: patient {CROSS_TYPE_PATIENT} is filed under more than one class: DC, LC" in err
    assert "cdft: warning: 4 set(s) of byte-identical images, each within one fold" in err


def test_same_command_twice_gives_byte_identical_csvs(capsys, root, tmp_path):
    for name in ("a.csv", "b.csv"):
        code, _, err = run_cli(capsys, "prepare", "breakhis", root, "--magnification", "all", "--task", "subtype",
                               "--split=image", "-o", str(tmp_path / name))  # fmt: skip
        assert code == 0, err
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.csv"]  # no temporary files left


def test_prepare_json_summary_and_image_split_leakage(capsys, root, tmp_path):
    code, out, err = run_cli(capsys, "prepare", "breakhis", root, "--split", "image", "--seed", "1", "--json",
                             "-o", str(tmp_path / "image.csv"))  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)
    table = pd.read_csv(tmp_path / "image.csv")
    assert summary["output"] == str(tmp_path / "image.csv")
    assert summary["options"] == {"task": "malignant-subtype", "magnification": "200X", "split": "image"}
    assert summary["images"] == len(table) and summary["n_folds"] == 5 and summary["seed"] == 1
    assert [c["name"] for c in summary["classes"]] == ["DC", "LC", "MC", "PC"]
    for row in summary["classes"]:
        counts = table[table["label"] == row["label"]].groupby("fold").size()
        assert row["per_fold"] == {str(f): int(counts.get(f, 0)) for f in range(5)}
    leaked = {r["group"] for r in summary["leakage"]}
    expected = {str(p) for p, n in table.groupby("patient")["fold"].nunique().items() if n > 1}
    assert leaked == expected and leaked
    assert summary["duplicates_across_folds"] >= 1
    assert any("across folds (leakage)" in w for w in summary["warnings"])


def test_prepare_writes_atomically(capsys, root, tmp_path, monkeypatch):
    out_csv = tmp_path / "split.csv"
    out_csv.write_text("the previous split\n")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    code, _, err = run_cli(capsys, "prepare", "breakhis", root, "-o", str(out_csv))
    assert code == 1
    assert "cdft: error: cannot write split file" in err and "disk full" in err and "Traceback" not in err
    assert out_csv.read_text() == "the previous split\n"
    assert [p.name for p in tmp_path.iterdir()] == ["split.csv"]  # the temporary file is gone
    monkeypatch.undo()
    code, _, err = run_cli(capsys, "prepare", "breakhis", root, "-o", "memory://cdft-cli-test/split.csv")
    assert code == 0, err
    import fsspec

    with fsspec.open("memory://cdft-cli-test/split.csv", "rt") as handle:
        assert handle.readline().startswith("image_path,label,fold")
    assert fsspec.filesystem("memory").ls("/cdft-cli-test", detail=False) == ["/cdft-cli-test/split.csv"]
    code, _, err = run_cli(capsys, "prepare", "breakhis", root, "-o", str(tmp_path / "no" / "dir.csv"))
    assert code == 2 and "folder" in err and "does not exist" in err


def test_make_synthetic_command(capsys, tmp_path):
    code, out, err = run_cli(capsys, "make-synthetic", "hcrf", str(tmp_path / "a"), "--seed", "4", "--json")
    assert code == 0, err
    made = json.loads(out)
    assert made == {"kind": "hcrf", "root": str(tmp_path / "a" / "HCRF"), "seed": 4}
    code, _, err = run_cli(capsys, "make-synthetic", "hcrf", str(tmp_path / "a"))
    assert code == 2 and "already exists and is not empty" in err
    run_cli(capsys, "make-synthetic", "hcrf", str(tmp_path / "b"), "--seed", "4")
    run_cli(capsys, "make-synthetic", "hcrf", str(tmp_path / "c"), "--seed", "5")
    a, b, c = (digest_tree(tmp_path / d / "HCRF") for d in "abc")
    assert a == b and a != c and a.keys() == c.keys()
    code, out, err = run_cli(capsys, "make-synthetic", "breakhis", str(tmp_path / "bh"))
    assert code == 0, err
    assert f"its data root is {tmp_path / 'bh' / 'BreaKHis_v1'}" in out and "next: cdft prepare breakhis" in out
    assert digest_tree(tmp_path / "bh" / "BreaKHis_v1") == digest_tree(Path(breakhis_root_for_seed0()))
    code, _, err = run_cli(capsys, "make-synthetic", "kather", str(tmp_path / "k"))
    assert code == 2 and "'kather' is not one of 'breakhis', 'hcrf'" in err


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_a_seed_numpy_cannot_take_is_a_usage_error(capsys, root, tmp_path, seed):
    """The fold assignment and the synthetic data draw with numpy, which takes [0, 2**32 - 1]:
    outside it, one usage line (as `cdft run --seed`), not numpy's ValueError."""
    for args in (("prepare", "breakhis", root, "-o", str(tmp_path / "s.csv")),
                 ("make-synthetic", "hcrf", str(tmp_path / "syn"))):
        code, _, err = run_cli(capsys, *args, "--seed", seed)
        assert code == 2 and "'--seed'" in err and "is not in the range 0<=x<=4294967295" in err, err
    assert list(tmp_path.iterdir()) == []


def breakhis_root_for_seed0() -> str:
    from helpers_data import _CACHE

    return _CACHE["breakhis"]  # built by the module fixture with seed 0


def test_list_datasets_shows_classes_protocols_and_options(capsys, root):
    code, out, err = run_cli(capsys, "list", "datasets", "--json")
    assert code == 0, err
    by_name = {entry["name"]: entry["metadata"] for entry in json.loads(out)}
    assert {"breakhis", "hcrf", "csv", "imagefolder"} <= set(by_name)
    breakhis = by_name["breakhis"]
    assert breakhis["classes"]["malignant-subtype"] == ["DC", "LC", "MC", "PC"]
    assert breakhis["classes"]["subtype"] == ["A", "F", "PT", "TA", "DC", "LC", "MC", "PC"]
    assert breakhis["default_protocol"] == "standard" and breakhis["default_folds"] == 5
    assert breakhis["options"]["magnification"] == {
        "choices": ["40X", "100X", "200X", "400X", "all"],
        "default": "200X",
        "help": "keep images of one magnification, or all",
        "filter_column": "magnification",
        "match_all": "all",
    }
    assert breakhis["groups_span_classes"] is False
    assert "shapes_split" not in breakhis["options"]["task"]  # the default (True) is not spelled out
    assert by_name["csv"]["options"]["groups_span_classes"]["shapes_split"] is False
    assert breakhis["options"]["split"]["default"] == "patient"
    hcrf = by_name["hcrf"]
    assert hcrf["classes"] == ["normal", "abnormal"]
    assert hcrf["default_protocol"] == "low-data" and set(hcrf["protocols"]) == {"standard", "low-data"}
    assert hcrf["default_folds"] == 4
    assert by_name["csv"]["options"]["table"]["default"] == "labels.csv"


def test_errors_in_a_real_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDFT_")}
    result = subprocess.run(
        [sys.executable, "-m", "cdft_cli", "prepare", "breakhis", str(tmp_path), "--resolution", "2", "-o", "x.csv"],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("cdft: error:")]
    assert errors == [
        "cdft: error: unknown option --resolution for `cdft prepare breakhis`; dataset options: --task, "
        "--magnification, --split; command options: --folds, --seed, -o/--output, --json"
    ]
    assert not (tmp_path / "x.csv").exists()


def test_prepare_help_lists_the_named_datasets_options(capsys, tmp_path):
    code, out, err = run_cli(capsys, "prepare", "breakhis", "--help")  # no ROOT, no -o: help comes first
    assert code == 0, err
    text = " ".join(out.split())
    assert "--folds INTEGER RANGE" in text and "-o, --output TEXT" in text  # the generic help is still there
    assert "Options of dataset 'breakhis':" in text
    assert "--magnification [40X|100X|200X|400X|all] keep images of one magnification, or all [default: 200X]" in text
    assert "--task [malignant-subtype|benign-malignant|subtype]" in text and "--split [patient|image]" in text
    code, out, _ = run_cli(capsys, "prepare", "--folds", "3", "hcrf", str(tmp_path), "-h")
    text = " ".join(out.split())
    assert code == 0 and "Options of dataset 'hcrf':" in text
    assert "--normal TEXT name of the folder holding normal images (case-insensitive) [default: normal]" in text
    code, out, _ = run_cli(capsys, "prepare", "--help")
    assert code == 0 and "NAME --help lists the options of dataset NAME" in " ".join(out.split())
    code, out, _ = run_cli(capsys, "prepare", "breakhiss", "--help")
    assert code == 0 and "unknown dataset 'breakhiss'" in out
