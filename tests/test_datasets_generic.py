"""The generic csv and imagefolder datasets, and paper-format split files read unchanged."""

from __future__ import annotations

import pandas as pd
import pytest
from helpers_data import hcrf_root

from cdft_core.data.options import build_dataset
from cdft_core.data.protocol import Dataset
from cdft_core.data.splits import load_splits, prepare
from cdft_core.errors import UsageError


@pytest.fixture(scope="module")
def hcrf(tmp_path_factory) -> str:
    return hcrf_root(tmp_path_factory)


@pytest.fixture(scope="module")
def listing(hcrf) -> pd.DataFrame:
    """The HCRF images as a user's own CSV: 5 'patients', class names, an old fold column."""
    table = prepare("hcrf", hcrf, decode_check=1)
    table = table[["image_path", "label", "class_name"]].copy()
    table["group"] = [f"p{i % 5}{label}" for i, label in enumerate(table["label"])]
    table["fold"] = 9
    return table


def test_every_builtin_dataset_satisfies_the_protocol():
    for name, options in (("breakhis", {}), ("hcrf", {}), ("csv", {}), ("imagefolder", {})):
        dataset, resolved = build_dataset(name, options)
        assert isinstance(dataset, Dataset), name
        assert dataset.default_protocol in dataset.protocols


def test_csv_dataset_groups_and_names_classes(hcrf, listing):
    listing.to_csv(f"{hcrf}/labels.csv", index=False)
    table = prepare("csv", hcrf, folds=3, decode_check=1)
    assert sorted(table["fold"].unique()) == [0, 1, 2]  # the old fold column is replaced
    assert (table.groupby("group")["fold"].nunique() == 1).all()
    assert list(table.columns[:5]) == ["image_path", "label", "fold", "class_name", "group"]
    splits = load_splits("csv", hcrf, split_file=None, folds=3, val_fold=0, test_fold=1)
    assert splits.classes == ["normal", "abnormal"]
    renamed = load_splits("csv", hcrf, split_file=None, folds=3, val_fold=0, test_fold=1,
                          options={"table": "labels.csv", "classes": "healthy,tumour"}, decode_check=1)  # fmt: skip
    assert renamed.classes == ["healthy", "tumour"]


def test_csv_dataset_table_by_absolute_path_and_label_numbers(hcrf, listing, tmp_path):
    listing[["image_path", "label"]].to_csv(tmp_path / "mine.csv", index=False)
    table = prepare("csv", hcrf, options={"table": str(tmp_path / "mine.csv")}, decode_check=1)
    assert table["class_name"].tolist() == [str(v) for v in table["label"]]
    listing[["image_path"]].to_csv(tmp_path / "broken.csv", index=False)
    with pytest.raises(UsageError, match=r"--table .*broken.csv' has no column label .*needs image_path,label"):
        prepare("csv", hcrf, options={"table": str(tmp_path / "broken.csv")})


def test_paper_format_split_file_is_read_unchanged(hcrf, tmp_path):
    """image_path,label,fold only, as the paper's notebook wrote them."""
    table = prepare("hcrf", hcrf, decode_check=1)[["image_path", "label", "fold"]]
    table.to_csv(tmp_path / "paper.csv", index=False)
    for name in ("hcrf", "csv"):
        splits = load_splits(name, hcrf, split_file=str(tmp_path / "paper.csv"), val_fold=1, test_fold=3)
        assert list(splits.train.columns) == ["image_path", "label", "fold"]
        assert (
            pd.concat([splits.train, splits.val, splits.test])
            .sort_values("image_path")
            .reset_index(drop=True)
            .equals(table.sort_values("image_path").reset_index(drop=True))
        )
    assert load_splits("csv", hcrf, split_file=str(tmp_path / "paper.csv"), val_fold=1, test_fold=3).classes == [
        "0",
        "1",
    ]


def test_imagefolder(tmp_path, hcrf):
    import shutil

    for name in ("Normal", "Abnormal"):
        shutil.copytree(f"{hcrf}/{name}", tmp_path / "data" / name.lower())
    root = str(tmp_path / "data")
    table = prepare("imagefolder", root, decode_check=1)
    # masks are plain images here: imagefolder takes every image in the class folders
    assert table.groupby("class_name").size().to_dict() == {"abnormal": 24, "normal": 8}
    assert (table["label"] == table["class_name"].map({"abnormal": 0, "normal": 1})).all()
    ordered = prepare("imagefolder", root, options={"classes": "normal,abnormal"}, decode_check=1)
    assert (ordered["label"] == ordered["class_name"].map({"normal": 0, "abnormal": 1})).all()
    table[["image_path", "label", "fold"]].to_csv(tmp_path / "split.csv", index=False)
    splits = load_splits("imagefolder", root, split_file=str(tmp_path / "split.csv"), val_fold=0, test_fold=1)
    assert splits.classes == ["abnormal", "normal"]  # read back from the class folders of the paths
    with pytest.raises(UsageError, match="--classes names folder.*tumour; folders with images: abnormal, normal"):
        prepare("imagefolder", root, options={"classes": "normal,tumour"})


def test_a_root_made_of_symbolic_links_is_read_through_them(hcrf, tmp_path):
    """Class folders and images linked from elsewhere are found; a link cycle does not loop."""
    import os

    root = tmp_path / "linked"
    (root / "abnormal").mkdir(parents=True)
    os.symlink(f"{hcrf}/Normal", root / "normal", target_is_directory=True)
    for image in sorted(os.listdir(f"{hcrf}/Abnormal")):
        if image.endswith(".png"):
            os.symlink(f"{hcrf}/Abnormal/{image}", root / "abnormal" / image)
    os.symlink(root, root / "normal_loop", target_is_directory=True)  # a link back up the tree
    os.symlink(tmp_path / "gone.png", root / "abnormal" / "dangling.png")
    table = prepare("imagefolder", str(root), options={"classes": "normal,abnormal"}, folds=2, decode_check=None)
    expected = {
        "normal": len([f for f in os.listdir(f"{hcrf}/Normal") if f.endswith((".png", ".tiff"))]),
        "abnormal": len([f for f in os.listdir(f"{hcrf}/Abnormal") if f.endswith(".png")]),
    }
    assert table.groupby("class_name").size().to_dict() == expected
    assert not table["image_path"].str.contains("loop|dangling").any()


def test_summary_and_warnings_on_a_hand_made_table():
    from cdft_core.data.report import summarise, warnings_of

    table = pd.DataFrame(
        {
            "image_path": ["a.png", "b.png", "c.png", "c.png", "d.png", "e.png"],
            "label": [0, 0, 1, 1, 1, 0],
            "fold": [0, 1, 1, 1, 0, 2],
            "group": ["p1", "p1", "p2", "p2", "p3", "p4"],
        }
    )
    summary = summarise(
        table, ["x", "y", "z"], group_column="group", duplicates=[["a.png", "d.png"], ["b.png", "e.png"]]
    )
    assert summary["images"] == 6 and summary["groups"] == 4
    assert summary["leakage"] == [{"group": "p1", "folds": [0, 1]}]
    assert summary["cross_class_groups"] == []
    assert summary["classes"][0]["per_fold"] == {"0": 1, "1": 1, "2": 1} and summary["classes"][0]["groups"] == 2
    assert summary["folds"] == [
        {"fold": 0, "images": 2, "groups": 2},
        {"fold": 1, "images": 3, "groups": 2},
        {"fold": 2, "images": 1, "groups": 1},
    ]
    assert summary["duplicates_across_folds"] == 1  # a/d share fold 0; b/e are in folds 1 and 2
    assert summary["repeated_rows"] == ["c.png"]
    assert summary["empty_classes"] == ["z"] and summary["sparse_classes"] == []
    lines = warnings_of(summary)
    assert lines == [
        "2 set(s) of byte-identical images, 1 of them across folds (leakage), e.g. a.png = d.png; 1 more in --json",
        "1 image path(s) listed more than once: c.png",
        "class z has no images",
        "1 of 3 fold(s) lack a class, 1 fold/class pair(s) (no image to validate or test it on there): fold 2 lacks y",
    ]
    table.loc[4, "group"] = "p2"  # p2 now has labels 1 only; make a cross-class group
    table.loc[5, "group"] = "p2"
    crossed = summarise(table, ["x", "y", "z"], group_column="group")
    assert crossed["cross_class_groups"] == [{"group": "p2", "classes": ["x", "y"]}]
    assert "group p2 is filed under more than one class: x, y" in warnings_of(crossed)
    assert summarise(table, ["x", "y"], group_column=None)["leakage"] == []


def test_many_warnings_of_one_kind_are_one_capped_line():
    from cdft_core.data.report import summarise, warnings_of

    # six patients each in two classes; classes c, d, e, f empty; one image of b in 2 folds
    rows = [(f"p{i}", label, i % 2) for i in range(6) for label in (0, 1)] + [("q", 1, 0)]
    table = pd.DataFrame(
        [{"image_path": f"{n}.png", "label": label, "fold": fold, "patient": patient}
         for n, (patient, label, fold) in enumerate(rows)]
    )  # fmt: skip
    summary = summarise(table, list("abcdef"), group_column="patient")
    assert len(summary["cross_class_groups"]) == 6 and summary["empty_classes"] == list("cdef")
    lines = warnings_of(summary)
    assert lines[:2] == [
        "6 patients are filed under more than one class, e.g. p0 (a, b), p1 (a, b), p2 (a, b); 3 more in --json",
        "4 classes have no images: c, d, e; 1 more in --json",
    ]
    assert len(lines) == 2
    sparse = summarise(table.assign(fold=range(len(table))), list("ab") + ["g"] * 0, group_column=None)
    assert sparse["sparse_classes"] == ["a", "b"]
    assert "2 classes have fewer images than folds (some folds have none of them): a, b" in warnings_of(sparse)


def test_a_dataset_whose_groups_span_classes_is_not_warned():
    from cdft_core.data.report import summarise, warnings_of

    table = pd.DataFrame({"image_path": ["a.png", "b.png"], "label": [0, 1], "fold": [0, 0], "patient": ["p", "p"]})
    warned = summarise(table, ["stroma", "tumour"], group_column="patient")
    assert warnings_of(warned) == ["patient p is filed under more than one class: stroma, tumour"]
    declared = summarise(table, ["stroma", "tumour"], group_column="patient", groups_span_classes=True)
    assert declared["cross_class_groups"] == [{"group": "p", "classes": ["stroma", "tumour"]}]  # still in --json
    assert declared["groups_span_classes"] is True and warnings_of(declared) == []


def test_the_csv_dataset_declares_groups_spanning_classes_by_option(hcrf, listing, tmp_path):
    from cdft_core.data.report import warnings_of
    from cdft_core.data.splits import prepare_with_summary

    # two groups, each holding both classes
    crossed = listing.assign(group=["p" + str(n % 2) for n in listing.groupby("label").cumcount()])
    crossed.to_csv(tmp_path / "crossed.csv", index=False)
    options = {"table": str(tmp_path / "crossed.csv")}
    table, summary = prepare_with_summary("csv", hcrf, options=options, folds=2, decode_check=1, duplicates=False)
    assert [line for line in warnings_of(summary) if "filed under" in line] == [
        "2 groups are filed under more than one class, e.g. p0 (normal, abnormal), p1 (normal, abnormal)"
    ]
    _, quiet = prepare_with_summary(
        "csv", hcrf, options={**options, "groups_span_classes": "yes"}, folds=2, decode_check=1, duplicates=False
    )
    assert not [line for line in warnings_of(quiet) if "filed under" in line]
    assert set(table["cdft_option_groups_span_classes"]) == {"no"}  # recorded, but it shapes nothing
