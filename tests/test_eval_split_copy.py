"""A run keeps the split table it trained on (``RUN/split.csv``), and ``cdft eval`` of the run
evaluates that copy: editing the configured split file afterwards changes nothing but a warning."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from helpers_engine import engine_data, invoke, quick_args, read_json

from cdft_core.data.splits import load_splits

PARTS = ("train", "val", "test")


def _rows(splits) -> dict[str, list[tuple]]:
    return {name: list(zip(*(getattr(splits, name)[c].tolist() for c in ("image_path", "label", "fold")), strict=True))
            for name in PARTS}


def _eval(target: Path, *extra: str) -> tuple[dict, str]:
    code, out, err = invoke("eval", str(target), "--json", "--device", "cpu", "--num-workers", "0", *extra)
    assert code == 0, err
    return json.loads(out)["metrics"], err


@pytest.mark.slow
def test_eval_evaluates_the_runs_own_split_after_the_split_file_is_edited(tmp_path_factory, tmp_path):
    root, prepared = engine_data(tmp_path_factory)
    edit = tmp_path / "edit.csv"
    shutil.copy(prepared, edit)
    run = tmp_path / "run"
    code, _, err = invoke(*quick_args(root, str(edit), strategy="linear", epochs=1), "--output", str(run))
    assert code == 0, err
    summary = read_json(run / "summary.json")

    # the copy round-trips: the same rows, folds, classes and options as the file the run read
    original = load_splits("breakhis", root, split_file=str(edit), val_fold=1, test_fold=3)
    copy = load_splits("breakhis", root, split_file=str(run / "split.csv"), val_fold=1, test_fold=3)
    assert _rows(copy) == _rows(original) and copy.classes == original.classes and copy.options == original.options
    assert all(copy.groups(name) == original.groups(name) for name in PARTS)

    metrics, err = _eval(run)
    assert metrics == summary["test"] and "changed" not in err

    table = pd.read_csv(edit)  # drop one test image from the configured file
    table.drop(index=table.index[table["fold"] == 3][0]).to_csv(edit, index=False)
    metrics, err = _eval(run)
    assert metrics == summary["test"] and metrics["n"] == summary["test"]["n"]
    assert err.count("warning:") == 1 and "changed since the run" in err and "split.csv" in err
    checkpoint = run / summary["checkpoint"]
    assert _eval(checkpoint)[0] == summary["test"]  # a checkpoint inside the run: the same
    metrics, err = _eval(run, "--split-file", str(edit))  # an explicit split file is still honoured
    assert metrics["n"] == summary["test"]["n"] - 1 and "warning" not in err

    edit.unlink()  # the configured file gone: the copy, silently
    metrics, err = _eval(run)
    assert metrics == summary["test"] and "warning" not in err


@pytest.mark.slow
def test_in_memory_and_probe_runs_keep_their_split(tmp_path_factory, tmp_path):
    root, prepared = engine_data(tmp_path_factory)
    args = quick_args(root, prepared, strategy="linear", epochs=1)
    at = args.index("--split-file")
    del args[at:at + 2]  # split in memory: the folds the seed gives
    run = tmp_path / "memory"
    code, _, err = invoke(*args, "--seed", "3", "--output", str(run))
    assert code == 0, err
    expected = load_splits("breakhis", root, split_file=None, val_fold=1, test_fold=3, seed=3)
    copy = load_splits("breakhis", root, split_file=str(run / "split.csv"), val_fold=1, test_fold=3)
    assert _rows(copy) == _rows(expected)
    assert _eval(run)[0] == read_json(run / "summary.json")["test"]

    probe = tmp_path / "probe"
    code, _, err = invoke("probe", "--dataset", "breakhis", "--data-root", root, "--split-file", prepared,
                          "--val-fold", "1", "--test-fold", "3", "--backbone", "test_vit", "--no-pretrained",
                          "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--num-workers", "0",
                          "--device", "cpu", "--lrs", "1e-2", "--weight-decays", "0", "--output", str(probe))
    assert code == 0, err
    original = load_splits("breakhis", root, split_file=prepared, val_fold=1, test_fold=3)
    copy = load_splits("breakhis", root, split_file=str(probe / "split.csv"), val_fold=1, test_fold=3)
    assert _rows(copy) == _rows(original)
