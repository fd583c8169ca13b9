"""Data roots and split files as fsspec URLs: local, file://, memory:// and zip:// agree."""

from __future__ import annotations

import pytest
import torch
from helpers_data import DATA_CONFIG, copy_to_memory, small_breakhis_root, zip_tree

from cdft_core.data.images import ImageDataset
from cdft_core.data.root import DataRoot
from cdft_core.data.splits import load_splits, prepare
from cdft_core.data.tables import write_split_file
from cdft_core.data.transforms import eval_transform


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, str]:
    local = small_breakhis_root(tmp_path_factory)
    archive = tmp_path_factory.mktemp("zipped") / "data.zip"
    return {
        "local": local,
        "file": f"file://{local}",
        "memory": copy_to_memory(local, "cdft-fsspec-test/BreaKHis_v1"),
        "zip": zip_tree(local, archive),
    }


def test_same_table_and_samples_from_every_root(roots):
    tables = {
        kind: prepare("breakhis", url, options={"task": "subtype", "magnification": "all"})
        for kind, url in roots.items()
    }
    reference = tables["local"]
    assert len(reference) == 8 * 2 * 4 + 4 * 4
    for kind, table in tables.items():
        assert table.equals(reference), kind
    transform = eval_transform(DATA_CONFIG)
    rows = reference.iloc[[0, 17, len(reference) - 1]]
    expected = [ImageDataset(roots["local"], rows, transform)[i] for i in range(len(rows))]
    for kind, url in roots.items():
        dataset = ImageDataset(url, rows, transform)
        for i, (image, label) in enumerate(expected):
            got_image, got_label = dataset[i]
            assert got_label == label
            assert torch.equal(got_image, image), (kind, i)


def test_split_files_on_memory_and_zip(roots, tmp_path):
    import zipfile

    table = prepare("breakhis", roots["local"])
    write_split_file(table, "memory://cdft-fsspec-test/splits/split.csv")
    write_split_file(table, str(tmp_path / "split.csv"))
    with zipfile.ZipFile(tmp_path / "splits.zip", "w") as zf:
        zf.write(tmp_path / "split.csv", "splits/split.csv")
    results = []
    for split_file in (
        str(tmp_path / "split.csv"),
        "memory://cdft-fsspec-test/splits/split.csv",
        f"zip://splits/split.csv::{tmp_path / 'splits.zip'}",
    ):
        splits = load_splits("breakhis", roots["zip"], split_file=split_file, val_fold=0, test_fold=1)
        results.append(splits)
        assert splits.split_file == split_file
    for splits in results[1:]:
        for part in ("train", "val", "test"):
            assert getattr(splits, part).equals(getattr(results[0], part))


def test_image_dataset_reopens_the_filesystem_after_pickling(roots):
    import pickle

    table = prepare("breakhis", roots["zip"], decode_check=1).iloc[:2]
    dataset = ImageDataset(roots["zip"], table, None)
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._opened is None
    image, label = clone[1]
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 96)
    assert label == int(table["label"].iloc[1])
    assert torch.equal(image, dataset[1][0])


def test_data_root_paths_and_missing_archives(roots, tmp_path):
    zipped = DataRoot.open(roots["zip"])
    assert zipped.base == "BreaKHis_v1"
    files = zipped.files()
    assert files and all(not p.startswith(("/", "BreaKHis_v1")) for p in files)
    memory = DataRoot.open(roots["memory"])
    assert list(memory.files()) == list(files)
    from cdft_core.errors import UsageError

    with pytest.raises(UsageError, match="does not exist"):
        DataRoot.open(f"zip://BreaKHis_v1::{tmp_path / 'missing.zip'}")
    with pytest.raises(UsageError, match="does not exist"):
        DataRoot.open("memory://cdft-fsspec-test/nothing-here")
