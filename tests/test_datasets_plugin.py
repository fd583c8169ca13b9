"""A third-party dataset: the plugin written out in docs/datasets.md, and cheap plugin imports."""

from __future__ import annotations

import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
from helpers_data import hcrf_root

from cdft_core.data.report import warnings_of
from cdft_core.data.splits import load_splits, prepare, prepare_with_summary
from cdft_core.errors import UsageError
from cdft_core.registry import load_registry

DOCS = Path(__file__).resolve().parents[1] / "docs" / "datasets.md"


def docs_tiles_module() -> types.ModuleType:
    text = DOCS.read_text(encoding="utf-8")
    match = re.search(r"<!-- tiles-plugin[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/datasets.md lost its tiles plugin block"
    module = types.ModuleType("cdft_tiles")
    exec(compile(match.group(1), str(DOCS), "exec"), module.__dict__)
    return module


@pytest.fixture
def tiles_root(tmp_path, tmp_path_factory) -> str:
    source = sorted(Path(hcrf_root(tmp_path_factory)).rglob("normal_00[01].png"))
    for stain in ("HE", "IHC"):
        (tmp_path / stain).mkdir()
        for patient in range(4):
            for i, class_name in enumerate(("stroma", "tumour", "tumour")):
                name = f"p{patient}{stain}_{class_name}_{i}.png"
                (tmp_path / stain / name).write_bytes(source[i % 2].read_bytes())
    return str(tmp_path)


def test_docs_plugin_prepares_and_splits(tiles_root):
    registry = load_registry(builtins=False, entry_points=False, extra_plugins=[("tiles", docs_tiles_module())])
    component = registry.get("dataset", "tiles")
    assert component.metadata["options"]["stain"]["choices"] == ["HE", "IHC"]
    assert component.metadata["classes"] == ["stroma", "tumour"]

    table, summary = prepare_with_summary("tiles", tiles_root, options={"stain": "ihc"}, registry=registry)
    assert len(table) == 12 and table["image_path"].str.startswith("IHC/").all()
    assert sorted(table["fold"].unique()) == [0, 1, 2]
    assert (table.groupby("patient")["fold"].nunique() == 1).all()
    assert summary["leakage"] == [] and summary["group_column"] == "patient"
    assert len(summary["duplicates"]) == 2  # the test copies two source images around

    # every patient gives stroma and tumour tiles, which Tiles declares normal: listed, not warned
    assert component.metadata["groups_span_classes"] is True
    assert len(summary["cross_class_groups"]) == 4 and summary["groups_span_classes"] is True
    assert not [line for line in warnings_of(summary) if "filed under" in line]

    splits = load_splits("tiles", tiles_root, split_file=None, val_fold=0, test_fold=2, registry=registry)
    assert splits.classes == ["stroma", "tumour"] and set(splits.train["fold"]) == {1}
    with pytest.raises(UsageError, match="invalid value 'pas' for option 'stain' of dataset 'tiles'; choose from: HE, IHC"):
        prepare("tiles", tiles_root, options={"stain": "pas"}, registry=registry)


def test_plugin_modules_import_without_heavy_packages():
    code = (
        "import sys\n"
        "import cdft_plugins.breakhis, cdft_plugins.hcrf, cdft_plugins.csv_dataset, cdft_plugins.imagefolder\n"
        "import cdft_cli.prepare, cdft_cli.synthetic, cdft_core.data.protocol, cdft_core.data.options, cdft_core.data.tables, cdft_core.data.splits, cdft_core.data.folds, cdft_core.data.report, cdft_core.data.root, cdft_core.data.synthetic\n"
        "heavy = sorted({'torch', 'torchvision', 'pandas', 'sklearn', 'numpy', 'PIL'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_the_declaration_patients_in_several_classes_are_warned(tiles_root):
    module = docs_tiles_module()

    class StrictTiles(module.Tiles):
        groups_span_classes = False

    module.Tiles = StrictTiles
    registry = load_registry(builtins=False, entry_points=False, extra_plugins=[("tiles", module)])
    _, summary = prepare_with_summary("tiles", tiles_root, registry=registry, duplicates=False)
    assert [line for line in warnings_of(summary) if "filed under" in line] == [
        "4 patients are filed under more than one class, e.g. p0HE (stroma, tumour), p1HE (stroma, tumour), "
        "p2HE (stroma, tumour); 1 more in --json"
    ]
