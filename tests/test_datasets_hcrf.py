"""HCRF: class folders, mask skipping, the paper's 4-fold low-data protocol."""

from __future__ import annotations

import pytest
from helpers_data import hcrf_root

from cdft_core.data.splits import load_splits, prepare
from cdft_core.errors import CdftError, UsageError
from cdft_plugins.hcrf import is_mask


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return hcrf_root(tmp_path_factory)


@pytest.mark.parametrize(
    ("path", "mask"),
    [
        ("Abnormal/img_001_GT.png", True),
        ("Abnormal/img_001-gt.tif", True),
        ("Abnormal/masks/img_001.png", True),
        ("Abnormal/GT/img_001.png", True),
        ("GroundTruth/Abnormal/img_001.png", True),
        ("Abnormal/img 001 mask.tiff", True),
        ("Abnormal/img_001.png", False),
        ("Abnormal/gtx_001.png", False),
        ("Abnormal/unmasked_001.png", False),
        ("Abnormal/GTEx/img.png", False),
    ],
)
def test_mask_rule(path, mask):
    assert is_mask(path.split("/")) is mask


def test_scan_skips_masks_and_reads_both_classes(root):
    table = prepare("hcrf", root, decode_check=None)  # decodes every image, TIFFs included
    paths = table["image_path"].tolist()
    assert len(paths) == 8 + 12
    assert not any("_GT" in p or "/masks/" in p for p in paths)
    assert any(p.endswith(".tiff") for p in paths)
    assert table.groupby("class_name").size().to_dict() == {"abnormal": 12, "normal": 8}
    assert (table["label"] == table["class_name"].map({"normal": 0, "abnormal": 1})).all()
    assert all(
        p.split("/")[0] == ("Normal" if c == "normal" else "Abnormal")
        for p, c in zip(paths, table["class_name"], strict=True)
    )
    assert sorted(table["fold"].unique()) == [0, 1, 2, 3]  # 4 folds by default
    per_fold = table.groupby(["fold", "label"]).size().unstack()
    assert (per_fold[0] == 2).all() and (per_fold[1] == 3).all()  # stratified


def test_paper_protocol_trains_on_the_test_fold(root):
    splits = load_splits("hcrf", root, split_file=None, val_fold=2, test_fold=0, decode_check=1)
    assert splits.protocol == "low-data"
    assert splits.classes == ["normal", "abnormal"]
    assert set(splits.train["fold"]) == {0}
    assert set(splits.val["fold"]) == {2}
    assert set(splits.test["fold"]) == {1, 3}
    assert len(splits.train) == 5 and len(splits.test) == 10


def test_standard_protocol_by_option(root):
    splits = load_splits("hcrf", root, split_file=None, val_fold=2, test_fold=0, protocol="standard", decode_check=1)
    assert splits.protocol == "standard"
    assert set(splits.train["fold"]) == {1, 3}
    assert set(splits.val["fold"]) == {2} and set(splits.test["fold"]) == {0}
    with pytest.raises(UsageError, match="unknown protocol 'paper'.*choose from: standard, low-data"):
        load_splits("hcrf", root, split_file=None, val_fold=2, test_fold=0, protocol="paper")


def test_class_folders_are_matched_case_insensitively_and_can_be_renamed(tmp_path, root):
    import shutil

    shutil.copytree(f"{root}/Normal", tmp_path / "GastricSlice" / "NORMAL")
    shutil.copytree(f"{root}/Abnormal", tmp_path / "GastricSlice" / "cancer")
    (tmp_path / "README.png").write_bytes((tmp_path / "GastricSlice/NORMAL/normal_000.png").read_bytes())
    with pytest.raises(CdftError, match="no HCRF images.*'normal' and 'abnormal'.*--normal/--abnormal"):
        prepare("hcrf", str(tmp_path / "GastricSlice" / "cancer" / "masks"))
    table = prepare("hcrf", str(tmp_path), options={"abnormal": "Cancer"}, decode_check=1)
    assert table.groupby("label").size().to_dict() == {0: 8, 1: 12}
    assert table["image_path"].str.startswith("GastricSlice/").all()  # README.png is outside both folders


def _tree(top, paths: list[str]) -> str:
    for path in paths:
        (top / path).parent.mkdir(parents=True, exist_ok=True)
        (top / path).write_bytes(b"not decoded: the scan fails first")
    return str(top)


def test_a_tree_of_masks_only_says_how_many_and_why(tmp_path):
    paths = [f"Normal/GT/n{i}.png" for i in range(4)] + [f"Abnormal/a{i}_mask.tif" for i in range(3)]
    root = _tree(tmp_path / "HCRF-masks", paths)
    with pytest.raises(CdftError) as raised:
        prepare("hcrf", root)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"all 7 image files under {root} are ground-truth masks")
    assert "gt, mask or groundtruth in the file or folder name" in message
    assert "point the data root at the folder holding the original images" in message


def test_masks_beside_images_outside_class_folders_are_counted(tmp_path):
    root = _tree(tmp_path / "HCRF-flat", ["img_1.png", "img_2.png", "img_1_GT.png"])
    with pytest.raises(CdftError, match=r"no HCRF images .*\(1 of its 3 image files are masks and were skipped\)"):
        prepare("hcrf", root)
    masks = _tree(tmp_path / "masks", ["Normal/n1.png"])  # the root is the masks folder: its files look like images
    with pytest.raises(CdftError, match="the data root itself is named like a mask folder"):
        prepare("hcrf", masks, options={"normal": "other"})
