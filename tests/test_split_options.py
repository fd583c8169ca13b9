"""A split file records the dataset and options it was made with; a run must agree with it.

`cdft prepare` writes them as the file's last columns. A run that is silent about an
option takes the file's value; one that names another value is refused in one line
(exit 2, before any model is built), unless the file was made with ``all`` of an option
that can narrow its rows (BreakHis magnification). Files without the record (the
paper's, older cdft's) are read as before.
"""

from __future__ import annotations

import pandas as pd
import pytest
from helpers_data import breakhis_root
from helpers_engine import invoke, quick_args

from cdft_core.data.splits import load_splits, prepare
from cdft_core.data.tables import read_split_file, recorded_options, write_split_file
from cdft_core.errors import UsageError


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return breakhis_root(tmp_path_factory)


@pytest.fixture(scope="module")
def files(root, tmp_path_factory) -> dict[str, str]:
    """Split files of the synthetic BreakHis tree: 200X, 40X, every magnification, and a
    200X file as the paper's notebook would write it (no record)."""
    base = tmp_path_factory.mktemp("split-options")
    out = {}
    for name, magnification in (("200X", "200X"), ("40X", "40X"), ("all", "all")):
        out[name] = str(base / f"{name}.csv")
        write_split_file(prepare("breakhis", root, options={"magnification": magnification}, decode_check=1), out[name])
    old = pd.read_csv(out["200X"])
    out["old"] = str(base / "old.csv")
    old[["image_path", "label", "fold"]].to_csv(out["old"], index=False)
    return out


def _load(root: str, split_file: str, **options: str):
    return load_splits("breakhis", root, split_file=split_file, val_fold=0, test_fold=1, options=options, decode_check=1)


def test_the_record_round_trips_and_keeps_values_as_strings(files, tmp_path):
    table, dataset, options = recorded_options(read_split_file(files["200X"]), files["200X"])
    assert dataset == "breakhis"
    assert options == {"task": "malignant-subtype", "magnification": "200X", "split": "patient"}
    assert not any(c.startswith("cdft_") for c in table.columns)
    odd = pd.DataFrame({"image_path": ["a.png"], "label": [0], "fold": [0], "cdft_dataset": ["x"], "cdft_option_n": ["01"]})
    odd.to_csv(tmp_path / "odd.csv", index=False)
    assert recorded_options(read_split_file(str(tmp_path / "odd.csv")), "odd.csv")[2] == {"n": "01"}


def test_a_different_option_is_one_clear_line(root, files):
    with pytest.raises(UsageError) as raised:
        _load(root, files["200X"], magnification="40X")
    message = str(raised.value)
    assert "\n" not in message
    assert f"split file {files['200X']} was made with magnification=200X, but this run asks for magnification=40X" in message
    assert "pass --dataset-option magnification=200X" in message
    assert "rerun `cdft prepare breakhis ROOT --magnification 40X`" in message
    with pytest.raises(UsageError, match="made with task=malignant-subtype, but this run asks for task=subtype"):
        _load(root, files["200X"], task="subtype")
    with pytest.raises(UsageError, match="made with split=patient, but this run asks for split=image"):
        _load(root, files["200X"], split="image")


def test_the_same_options_or_none_use_the_file_as_made(root, files):
    same = _load(root, files["40X"], magnification="40x")  # choices match case-insensitively
    assert same.options["magnification"] == "40X"
    silent = _load(root, files["40X"])  # silent: the file's 40X, not the default 200X
    assert silent.options == {"task": "malignant-subtype", "magnification": "40X", "split": "patient"}
    rows = pd.concat([silent.train, silent.val, silent.test])
    assert set(rows["magnification"]) == {"40X"}
    assert not any(c.startswith("cdft_") for c in rows.columns)


def test_a_file_made_for_every_magnification_is_narrowed(root, files):
    everything = _load(root, files["all"])
    assert everything.options["magnification"] == "all"
    assert set(pd.concat([everything.train, everything.val, everything.test])["magnification"]) == {
        "40X", "100X", "200X", "400X"
    }
    narrowed = _load(root, files["all"], magnification="200X")
    rows = pd.concat([narrowed.train, narrowed.val, narrowed.test])
    assert narrowed.options["magnification"] == "200X" and set(rows["magnification"]) == {"200X"}
    full = pd.read_csv(files["all"])
    assert sorted(rows["image_path"]) == sorted(full[full["magnification"] == "200X"]["image_path"])
    # the other way round (one magnification cannot become all of them) is refused
    with pytest.raises(UsageError, match="made with magnification=200X, but this run asks for magnification=all"):
        _load(root, files["200X"], magnification="all")


def test_an_old_file_without_a_record_is_accepted(root, files):
    splits = _load(root, files["old"], magnification="40X")  # unknown: the run's options, as before
    assert splits.options["magnification"] == "40X"
    assert list(splits.train.columns) == ["image_path", "label", "fold"]


def test_another_dataset_or_mixed_records_are_refused(root, files, tmp_path):
    table = pd.read_csv(files["200X"])
    table.assign(cdft_dataset="hcrf").to_csv(tmp_path / "hcrf.csv", index=False)
    with pytest.raises(UsageError, match="was made for dataset 'hcrf', not 'breakhis'; run with --dataset hcrf"):
        _load(root, str(tmp_path / "hcrf.csv"))
    pd.concat([table, pd.read_csv(files["40X"])]).to_csv(tmp_path / "mixed.csv", index=False)
    with pytest.raises(UsageError, match="mixes values of cdft_option_magnification: 200X, 40X"):
        _load(root, str(tmp_path / "mixed.csv"))


def test_cdft_run_refuses_before_building_a_model(root, files, tmp_path, monkeypatch):
    import cdft_core.models.model as model_module

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the options were checked")

    monkeypatch.setattr(model_module, "build_model", no_model)
    args = quick_args(root, files["200X"], strategy="linear", epochs=1)
    code, _, err = invoke(*args, "--output", str(tmp_path / "run"), "--dataset-option", "magnification=40X")
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("cdft: error: split file "), err
    assert "magnification=200X, but this run asks for magnification=40X" in lines[0]
    assert not (tmp_path / "run").exists()


def test_an_option_the_file_was_made_without_is_refused(root, files, tmp_path):
    rows = pd.read_csv(files["200X"])[["image_path", "label"]]
    rows.to_csv(f"{tmp_path}/labels.csv", index=False)
    made = prepare("csv", root, options={"table": f"{tmp_path}/labels.csv"}, decode_check=1)  # no --classes
    assert "cdft_option_classes" not in made.columns
    write_split_file(made, f"{tmp_path}/csv.csv")

    def load(**options):
        return load_splits("csv", root, split_file=f"{tmp_path}/csv.csv", val_fold=0, test_fold=1, options=options,
                           decode_check=1)  # fmt: skip

    assert load().options == {"table": f"{tmp_path}/labels.csv", "groups_span_classes": "no"}
    with pytest.raises(UsageError, match="was made without option classes, but this run asks for classes=a,b,c,d"):
        load(classes="a,b,c,d")
    assert load(groups_span_classes="yes").options["groups_span_classes"] == "yes"  # shapes nothing: not compared


def test_config_yaml_records_the_options_the_rows_were_made_with(root, files, tmp_path):
    """A run silent about magnification trains on the file's 200X rows: its config says 200X,
    and the saved config repeats the run (it agrees with the split file)."""
    import yaml

    args = quick_args(root, files["200X"], strategy="linear", epochs=1)
    code, _, err = invoke(*args, "--output", str(tmp_path / "run"), "--max-steps-per-epoch", "1")
    assert code == 0, err
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["dataset_options"] == {"task": "malignant-subtype", "magnification": "200X", "split": "patient"}
    code, _, err = invoke("run", "--config", str(tmp_path / "run" / "config.yaml"), "--output", str(tmp_path / "again"),
                          "--max-steps-per-epoch", "1")
    assert code == 0, err
