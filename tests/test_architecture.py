"""The shape of the code: one declared plugin API that loads no torch, plugins that use only
it, small modules, one rule in one place, and the learning-rate contract as logged."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cdft_core
from cdft_core import UsageError
from cdft_core.text import env_flag, one_line, parse_bool, text_table

REPO = Path(__file__).resolve().parents[1]
PLUGIN_SOURCES = sorted((REPO / "plugins").glob("*.py")) + sorted(
    (REPO / "examples" / "cdft-plugin-example").rglob("cdft_plugin_example/*.py"))


def _cdft_imports(path: Path) -> list[str]:
    """Every module a file imports from the cdft_core package (any depth, any place in the file)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cdft_core":
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.split(".")[0] == "cdft_core"]
    return found


@pytest.mark.parametrize("path", PLUGIN_SOURCES, ids=lambda p: p.name)
def test_plugins_import_only_the_top_level_api(path):
    deeper = [module for module in _cdft_imports(path) if module != "cdft_core"]
    assert not deeper, f"{path.name} imports {deeper}; plugins use only `from cdft_core import ...`"


def test_the_api_is_declared_and_every_name_resolves():
    assert set(cdft_core._LAZY) <= set(cdft_core.__all__)
    for name in cdft_core.__all__:
        assert getattr(cdft_core, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        cdft_core.nothing  # noqa: B018


def test_the_api_is_documented():
    text = (REPO / "docs" / "plugins.md").read_text(encoding="utf-8")
    listed = [name for name in cdft_core.__all__ if f"`{name}`" in text or f"`{name}(" in text]
    missing = sorted(set(cdft_core.__all__) - set(listed) - {"__version__"})
    assert not missing, f"docs/plugins.md does not list {missing}"


def test_import_and_torch_free_names_load_no_torch():
    code = (
        "import sys, cdft_core\n"
        "for name in cdft_core.__all__:\n"
        "    if name not in cdft_core._LAZY:\n"
        "        getattr(cdft_core, name)\n"
        "import cdft_plugins.breakhis, cdft_plugins.hcrf, cdft_plugins.strategies, cdft_plugins.adapters\n"
        "import cdft_plugins.timm_backbones, cdft_plugins.csv_dataset, cdft_plugins.imagefolder, cdft_cli.main\n"
        "heavy = sorted({'torch', 'timm', 'pandas', 'numpy'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
        "cdft_core.PooledAdapter\n"
        "assert 'torch' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_no_module_is_over_450_lines():
    long = {str(p.relative_to(REPO)): n for p in (REPO / "cdft_core").rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 450}
    assert not long, long


def test_nothing_cites_the_spec_outside_the_repository():
    cited = [str(p.relative_to(REPO)) for p in REPO.rglob("*")
             if p.suffix in (".py", ".md", ".yaml") and not {".venv", ".tox", ".git", "build"} & set(p.parts)
             and "SPEC" + " §" in p.read_text(encoding="utf-8")]
    assert not cited, cited


# -- one rule, one place ------------------------------------------------------------------
@pytest.mark.parametrize(("text", "value"), [("1", True), ("yes", True), ("On", True), ("TRUE", True),
                                             ("0", False), ("no", False), ("off", False), ("false", False),
                                             ("", False), (True, True), (0, False)])
def test_one_boolean_parser(text, value):
    assert parse_bool(text) is value


def test_a_switch_that_says_no_is_off_and_nonsense_is_refused(monkeypatch):
    from cdft_core.registry import load_registry

    monkeypatch.setenv("CDFT_STRICT_PLUGINS", "no")  # once read as *strict*
    assert env_flag("CDFT_STRICT_PLUGINS") is False
    load_registry(entry_points=False)
    monkeypatch.setenv("CDFT_STRICT_PLUGINS", "maybe")
    with pytest.raises(UsageError, match="CDFT_STRICT_PLUGINS must be true or false"):
        load_registry(entry_points=False)


def test_config_adapter_options_and_switches_share_the_parser():
    from cdft_core.config import RunConfig, merge
    from cdft_core.models.model import _coerce

    assert merge(RunConfig(), {"pretrained": "off"}, source="t").pretrained is False
    assert merge(RunConfig(), {"tensorboard": "On"}, source="t").tensorboard is True
    assert _coerce("no", True, "adapter option x") is False
    with pytest.raises(UsageError, match="must be true or false"):
        merge(RunConfig(), {"pretrained": "perhaps"}, source="t")


def test_one_line_errors_and_one_table_renderer():
    assert one_line(ValueError("a\n  b\tc")) == "a b c"
    assert one_line(ValueError()) == "ValueError"
    assert len(one_line("x" * 1000)) == 300
    listing = text_table([["a", "long text"]], ["name", "desc"], max_width=5)
    assert listing.splitlines() == ["name  desc", "----  -----", "a     long…"]
    metrics = text_table([["acc", "0.5"], ["f1", "0.25"]], ["metric", "val"], numeric=True)
    assert metrics.splitlines()[2] == "acc      0.5"


def test_one_atomic_writer_for_split_files_and_run_files(tmp_path):
    import pandas as pd

    from cdft_core.data.tables import write_split_file
    from cdft_core.training.rundir import RunDir

    write_split_file(pd.DataFrame({"image_path": ["a.png"], "label": [0], "fold": [0]}), str(tmp_path / "s.csv"))
    RunDir(str(tmp_path / "run")).write_text("deep/er/x.json", "{}")
    assert (tmp_path / "run" / "deep" / "er" / "x.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "s.csv"]  # no temporary files left
    RunDir("memory://arch-run").write_text("a/b.txt", "hi")
    assert RunDir("memory://arch-run").read_text("a/b.txt") == "hi"


def test_one_list_of_image_extensions():
    from cdft_core.data import images, root

    assert not hasattr(images, "IMAGE_EXTENSIONS") or images.IMAGE_EXTENSIONS is root.IMAGE_EXTENSIONS
    sources = [p for p in (REPO / "plugins").glob("*.py") if '".tiff"' in p.read_text(encoding="utf-8")]
    assert not sources, f"{sources} keep their own extension list; use cdft_core.IMAGE_EXTENSIONS"


def test_listing_metadata_is_derived_from_the_objects():
    from cdft_core.registry import get_registry
    from cdft_core.strategy import build_strategy

    registry = get_registry()
    for name in ("linear", "full", "frt", "staged"):
        strategy = build_strategy(name, registry=registry)
        meta = registry.get("strategy", name).metadata
        assert meta["default_adapter"] == strategy.default_adapter
        assert meta["stages"] == [s.name for s in strategy.stages]
    for name in ("breakhis", "hcrf", "csv", "imagefolder"):
        component = registry.get("dataset", name)
        dataset = component.factory()
        meta = component.metadata
        assert (meta["default_folds"], meta["default_protocol"], meta["group_column"]) == (
            dataset.default_folds, dataset.default_protocol, dataset.group_column)
        assert list(meta["protocols"]) == list(dataset.protocols)


# -- the learning-rate contract, as a layer-wise decay strategy logs it ---------------------
def test_a_layer_wise_decay_strategy_logs_each_groups_rate(tmp_path_factory, monkeypatch):
    from helpers_engine import engine_data
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_strategies import _docs_llrd_module

    import cdft_core.registry as registry_module
    from cdft_core.config import RunConfig
    from cdft_core.training import engine
    from cdft_core.training.schedule import lr_factor

    root, split = engine_data(tmp_path_factory)
    registry = registry_module.load_registry(entry_points=False, extra_plugins=[("llrd", _docs_llrd_module())])
    monkeypatch.setattr(registry_module, "_REGISTRY", registry)
    out = tmp_path_factory.mktemp("llrd") / "run"
    lr, decay, steps = 2e-3, 0.5, 3
    config = RunConfig(dataset="breakhis", data_root=root, split_file=split, val_fold=1, test_fold=3,
                       backbone="test_vit", pretrained=False, image_size=32, strategy="llrd",
                       strategy_options={"blocks": "2", "decay": str(decay)}, epochs=2, lr=lr, warmup_epochs=0.5,
                       batch_size=8, num_workers=0, log_every=1, device="cpu", max_steps_per_epoch=steps,
                       output=str(out))
    engine.main(config)

    ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    scales = {"head": 1.0, "after_blocks": 1.0, "last1": decay, "last2": decay**2}
    assert {f"train/lr/{label}" for label in scales} <= set(ea.Tags()["scalars"])
    assert "train/lr" not in ea.Tags()["scalars"]  # no single figure that is wrong for every lr_scale != 1
    warmup = round(0.5 * steps)
    for label, scale in scales.items():
        events = ea.Scalars(f"train/lr/{label}")
        assert [e.step for e in events] == list(range(1, 2 * steps + 1))
        for event in events:
            step = event.step - 1  # the rate used for optimizer step `event.step`
            expected = lr * scale * lr_factor(step, warmup, 2 * steps, config.warmup_start_factor)
            assert math.isclose(event.value, expected, rel_tol=1e-5), (label, event.step)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if line["split"] == "train"]
    assert set(train[0]["lr_groups"]) == set(scales)
    assert train[-1]["lr_groups"]["last2"] == pytest.approx(train[-1]["lr_groups"]["head"] * decay**2)
    log = (out / "train.log").read_text()
    assert "llrd: 2 epochs x 3 steps, lr last2 0.0005, last1 0.001, after_blocks 0.002, head 0.002," in log
    assert "step 1/3: loss" in log and "lr last2 5e-06, last1 1e-05, after_blocks 2e-05, head 2e-05" in log
    assert os.path.exists(out / "summary.json")
