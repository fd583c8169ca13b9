"""BreakHis on the synthetic tree: tasks, magnification filter, patient and image splits."""

from __future__ import annotations

import pytest
from helpers_data import breakhis_root

from cdft_core.data.splits import load_splits, prepare, prepare_with_summary
from cdft_core.data.synthetic import CROSS_TYPE_PATIENT, LETTERED_PATIENT
from cdft_plugins.breakhis import FILE_NAME


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return breakhis_root(tmp_path_factory)


@pytest.fixture(scope="module")
def all_subtypes(root):
    """Every image of the tree, with the 8-type labels."""
    return prepare("breakhis", root, options={"task": "subtype", "magnification": "all"}, decode_check=2)


def test_file_name_parsing_strips_the_slide_letters():
    match = FILE_NAME.match("SOB_B_F-14-29960AB-100-012.png")
    assert match["kind"] == "B" and match["type"] == "F"
    assert match["slide"] == "29960AB" and match["patient"] == "29960"
    assert match["mag"] == "100" and match["seq"] == "012"
    assert FILE_NAME.match("SOB_M_DC-14-2523-200-001.png")["patient"] == "2523"
    assert FILE_NAME.match("notes.png") is None


def test_tree_has_the_real_layout_and_the_traps(all_subtypes):
    table = all_subtypes
    assert len(table) == 8 * 3 * 4 * 4 + 4 * 4 * 4  # + 13412 twice, 29960 on two slides
    assert set(table["magnification"]) == {"40X", "100X", "200X", "400X"}
    first = table["image_path"].iloc[0]
    assert first.startswith("histology_slides/breast/benign/SOB/adenosis/SOB_B_A-14-")
    parts = first.split("/")
    assert parts[-2] == "100X" and parts[-1].startswith(parts[-3]) and parts[-1].endswith("-100-001.png")
    cross = table[table["patient"] == CROSS_TYPE_PATIENT]
    assert sorted(cross["class_name"].unique()) == ["DC", "LC"]
    lettered = table[table["patient"] == LETTERED_PATIENT]
    assert sorted(lettered["slide"].unique()) == ["29960AB", "29960CD"]
    assert sorted(lettered["class_name"].unique()) == ["A", "F"]


@pytest.mark.parametrize(
    ("task", "classes"),
    [
        ("malignant-subtype", ["DC", "LC", "MC", "PC"]),
        ("benign-malignant", ["benign", "malignant"]),
        ("subtype", ["A", "F", "PT", "TA", "DC", "LC", "MC", "PC"]),
    ],
)
def test_class_mapping_for_each_task(root, all_subtypes, task, classes):
    table = prepare("breakhis", root, options={"task": task, "magnification": "all"}, decode_check=1)
    assert table["class_name"].tolist() == [classes[v] for v in table["label"]]
    folder_of_type = {"A": "adenosis", "F": "fibroadenoma", "PT": "phyllodes_tumor", "TA": "tubular_adenoma",
                      "DC": "ductal_carcinoma", "LC": "lobular_carcinoma", "MC": "mucinous_carcinoma",
                      "PC": "papillary_carcinoma"}  # fmt: skip
    for path, type_code, name in zip(table["image_path"], table["type"], table["class_name"], strict=True):
        assert f"/{folder_of_type[type_code]}/" in path
        if task == "benign-malignant":
            assert name == ("benign" if "/benign/" in path else "malignant")
        else:
            assert name == type_code
    if task == "malignant-subtype":
        assert len(table) == (all_subtypes["label"] >= 4).sum()
        assert not table["image_path"].str.contains("/benign/").any()
    else:
        assert len(table) == len(all_subtypes)


def test_magnification_filter(root):
    for magnification in ("40X", "400X"):
        table = prepare("breakhis", root, options={"magnification": magnification}, decode_check=1)
        assert set(table["magnification"]) == {magnification}
        assert table["image_path"].str.contains(f"/{magnification}/").all()
        assert len(table) == 4 * 3 * 4 + 2 * 4  # 4 types x 3 patients x 4 images + 13412 under DC and LC


def test_patient_split_never_shares_a_patient_and_balances_classes(all_subtypes):
    table = all_subtypes
    folds_per_patient = table.groupby("patient")["fold"].nunique()
    assert (folds_per_patient == 1).all()
    # the cross-type patient and the lettered-slide patient are one group each
    assert table[table["patient"] == CROSS_TYPE_PATIENT]["fold"].nunique() == 1
    assert table[table["patient"] == LETTERED_PATIENT]["fold"].nunique() == 1
    folds = sorted(table["fold"].unique())
    assert folds == [0, 1, 2, 3, 4]
    for label, rows in table.groupby("label"):
        biggest_patient = rows.groupby("patient").size().max()
        share = len(rows) / len(folds)
        counts = rows.groupby("fold").size().reindex(folds, fill_value=0)
        assert (abs(counts - share) <= biggest_patient).all(), (label, counts.tolist())
    sizes = table.groupby("fold").size()
    assert sizes.max() - sizes.min() <= table.groupby("patient").size().max()


def test_image_split_equals_sklearn_stratified_kfold(root):
    from sklearn.model_selection import StratifiedKFold

    table = prepare("breakhis", root, options={"split": "image"}, folds=5, seed=1, decode_check=1)
    assert table["image_path"].tolist() == sorted(table["image_path"])
    expected = [0] * len(table)
    splitter = StratifiedKFold(n_splits=5, shuffle=True, random_state=1)
    for fold, (_, test_rows) in enumerate(splitter.split(table["image_path"], table["label"])):
        for row in test_rows:
            expected[row] = fold
    assert table["fold"].tolist() == expected


def test_seed_changes_the_patient_split_and_the_same_seed_repeats_it(root):
    a = prepare("breakhis", root, seed=1, decode_check=1)
    b = prepare("breakhis", root, seed=1, decode_check=1)
    c = prepare("breakhis", root, seed=7, decode_check=1)
    assert a.equals(b)
    assert a["fold"].tolist() != c["fold"].tolist()


def test_summary_reports_cross_class_patients_duplicates_and_leakage(root):
    _, patient = prepare_with_summary("breakhis", root, decode_check=1)
    assert patient["leakage"] == []
    assert patient["cross_class_groups"] == [{"group": CROSS_TYPE_PATIENT, "classes": ["DC", "LC"]}]
    assert len(patient["duplicates"]) == 4  # 4 images of 13412 at 200X, filed twice
    assert all(len(d["folds"]) == 1 for d in patient["duplicates"])
    _, image = prepare_with_summary("breakhis", root, options={"split": "image"}, decode_check=1)
    assert image["leakage"], "an image-level split puts patients in several folds"
    leaked = {row["group"] for row in image["leakage"]}
    assert leaked <= set(prepare("breakhis", root, decode_check=1)["patient"].astype(str))
    assert image["group_column"] == "patient"


def test_default_protocol_trains_on_the_other_folds(root):
    splits = load_splits("breakhis", root, split_file=None, val_fold=1, test_fold=3, decode_check=1)
    assert splits.protocol == "standard"
    assert splits.classes == ["DC", "LC", "MC", "PC"]
    assert set(splits.train["fold"]) == {0, 2, 4}
    assert set(splits.val["fold"]) == {1} and set(splits.test["fold"]) == {3}
    patients = [set(part["patient"]) for part in (splits.train, splits.val, splits.test)]
    assert not (patients[0] & patients[1]) and not (patients[0] & patients[2]) and not (patients[1] & patients[2])
