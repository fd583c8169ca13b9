"""The foundation CLI in real processes: help, version, list, show, plugins, exit codes,
and plugins discovered through real entry points (fake distributions on PYTHONPATH)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import cdft_core


def cdft(*args: str, env: dict | None = None, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CDFT_")}
    full_env.update(env or {})
    if pythonpath is not None:
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), full_env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "cdft_cli", *args], capture_output=True, text=True, env=full_env, timeout=120
    )


def fake_distribution(site: Path, dist: str, module: str, source: str, version: str = "1.2.3", *,
                      entry_points: str | None = None) -> None:
    """Install a distribution with ``cdft`` entry points the way pip lays it out (dist-info);
    by default one entry point named after the distribution, pointing at ``module``."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[cdft]\n{entry_points or f'{dist} = {module}'}\n")


GOOD = """
from cdft_core import hookimpl

@hookimpl
def register_datasets(register):
    register("zz-alpha-tiles", dict, description="Alpha tiles")
    register("zz-beta-tiles", dict, description="Beta tiles", metadata={"classes": ["x", "y"]})

@hookimpl
def register_strategies(register):
    register("zz-probe", dict, description="A probe")
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    fake_distribution(site, "zz-good", "zz_good", GOOD)
    fake_distribution(site, "zz-import-error", "zz_import_error", "import zz_definitely_missing_dependency\n")
    fake_distribution(
        site,
        "zz-hook-error",
        "zz_hook_error",
        """
        from cdft_core import hookimpl

        @hookimpl
        def register_backbones(register):
            raise ValueError("hook exploded")
        """,
    )
    return site


def no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr, result.stderr


def test_help_is_fast_and_imports_no_torch():
    code = textwrap.dedent(
        """
        import sys, time
        t = time.perf_counter()
        from cdft_cli.main import main
        try:
            main(["--help"])
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        heavy = sorted(m for m in ("torch", "timm", "pandas", "sklearn", "torchvision", "tensorboard") if m in sys.modules)
        print("HEAVY", heavy)
        """
    )
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
    assert "Commands:" in result.stdout and "prepare" in result.stdout
    assert elapsed < 10  # generous: the measured figure is in the README (~0.1 s)


def test_version():
    result = cdft("--version")
    assert result.returncode == 0 and cdft_core.__version__ in result.stdout


def test_list_groups_by_kind_and_imports_no_torch():
    code = "import sys\nfrom cdft_cli.main import main\ntry:\n    main(['list'])\nexcept SystemExit as e:\n    print('CODE', e.code)\nprint('TORCH', 'torch' in sys.modules)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "CODE 0" in result.stdout, result.stderr
    assert "TORCH False" in result.stdout
    for heading in ("datasets:", "backbones:", "adapters:", "strategies:"):
        assert heading in result.stdout


def test_list_filter_json_and_provider(site):
    result = cdft("list", "datasets", "zz-*", "--json", pythonpath=site)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == ["zz-alpha-tiles", "zz-beta-tiles"]
    for row in rows:
        assert {"name", "kind", "provider", "description"} <= set(row)
        assert row["kind"] == "dataset" and row["provider"] == "zz-good"
    text = cdft("list", "strategies", "zz-*", pythonpath=site)
    assert "zz-probe" in text.stdout and "zz-good" in text.stdout and "A probe" in text.stdout
    # a bare glob filters every kind
    both = json.loads(cdft("list", "zz-*", "--json", pythonpath=site).stdout)
    assert {r["kind"] for r in both} == {"dataset", "strategy"}


def test_broken_plugins_are_isolated_and_reported(site):
    listing = cdft("list", "datasets", "zz-*", pythonpath=site)
    assert listing.returncode == 0
    assert "zz-alpha-tiles" in listing.stdout
    assert "zz-import-error" in listing.stderr and "zz_definitely_missing_dependency" in listing.stderr
    no_traceback(listing)

    plugins = cdft("plugins", "--json", pythonpath=site)
    assert plugins.returncode == 0
    info = {p["name"]: p for p in json.loads(plugins.stdout)}
    assert info["zz-good"]["status"] == "ok"
    assert info["zz-good"]["distribution"] == "zz-good" and info["zz-good"]["version"] == "1.2.3"
    assert info["zz-good"]["hooks"] == ["register_datasets", "register_strategies"]
    assert info["zz-import-error"]["status"] == "broken"
    assert "ModuleNotFoundError" in info["zz-import-error"]["error"]
    assert info["zz-hook-error"]["status"] == "broken"
    assert info["zz-hook-error"]["error"] == "in register_backbones: ValueError: hook exploded"

    table = cdft("plugins", pythonpath=site)
    line = next(row for row in table.stdout.splitlines() if row.startswith("zz-hook-error"))
    assert "broken: in register_backbones: ValueError: hook exploded" in line

    assert cdft("--help", pythonpath=site).returncode == 0


def test_strict_mode_reraises(site):
    result = cdft("list", env={"CDFT_STRICT_PLUGINS": "1"}, pythonpath=site)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("cdft: error:")
    no_traceback(result)


def test_plugin_switches(site):
    only = cdft("plugins", "--json", env={"CDFT_PLUGINS": "zz-good"}, pythonpath=site)
    names = {p["name"] for p in json.loads(only.stdout)}
    assert "zz-good" in names and "zz-import-error" not in names and "zz-hook-error" not in names
    disabled = cdft("list", "datasets", "zz-*", env={"CDFT_DISABLE_PLUGINS": "zz-good"}, pythonpath=site)
    assert "zz-alpha-tiles" not in disabled.stdout
    missing = cdft("list", env={"CDFT_PLUGINS": "zz-good,not-installed"}, pythonpath=site)
    assert missing.returncode == 2
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("cdft: error: CDFT_PLUGINS names plugin(s) that are not installed: not-installed;")
    assert "zz-good" in lines[0]  # the message lists what is installed


def test_usage_errors_exit_2_with_one_line(site):
    bad_kind = cdft("list", "models")
    assert bad_kind.returncode == 2
    assert bad_kind.stderr.strip() == "cdft: error: unknown component kind 'models'; choose from: datasets, backbones, adapters, strategies"
    bad_option = cdft("list", "--no-such-option")
    assert bad_option.returncode == 2 and "no-such-option" in bad_option.stderr
    no_traceback(bad_option)
    unknown = cdft("show", "dataset", "zz-alpha-tile", pythonpath=site)
    assert unknown.returncode == 2
    assert "did you mean 'zz-alpha-tiles'" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1 or all(
        line.startswith("cdft: warning:") for line in unknown.stderr.strip().splitlines()[:-1]
    )
    no_traceback(unknown)


def test_show_describes_one_component(site):
    result = cdft("show", "dataset", "zz-beta-tiles", "--json", pythonpath=site)
    assert result.returncode == 0
    assert json.loads(result.stdout)["metadata"] == {"classes": ["x", "y"]}


def test_debug_shows_traceback(site):
    result = cdft("--debug", "show", "dataset", "nope-nope", pythonpath=site)
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_example_package_is_discovered_and_can_be_disabled():
    listing = cdft("list", "datasets", "--json")
    rows = {r["name"]: r for r in json.loads(listing.stdout)}
    assert "example-tiles" in rows, "install examples/cdft-plugin-example (tox does) to run the suite"
    assert rows["example-tiles"]["provider"] == "example"
    plugins = {p["name"]: p for p in json.loads(cdft("plugins", "--json").stdout)}
    assert plugins["example"]["distribution"] == "cdft-plugin-example"
    assert plugins["example"]["builtin"] is False
    hidden = cdft("list", "datasets", "--json", env={"CDFT_DISABLE_PLUGINS": "example"})
    assert "example-tiles" not in {r["name"] for r in json.loads(hidden.stdout)}


def test_plugins_doc_shows_the_example_package_verbatim():
    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "plugins.md").read_text()
    source = (root / "examples/cdft-plugin-example/cdft_plugin_example/__init__.py").read_text()
    marker = "<!-- example-plugin: examples/cdft-plugin-example/cdft_plugin_example/__init__.py -->\n```python\n"
    start = doc.index(marker) + len(marker)
    assert doc[start : doc.index("```", start)] == source


def test_example_dataset_prepares_a_patient_grouped_split(tmp_path):
    from PIL import Image

    for patient in ("p1", "p2", "p3", "p4", "p5", "p6"):
        for cls, colour in (("stroma", (200, 80, 80)), ("tumour", (60, 60, 200))):
            for n in range(2):
                Image.new("RGB", (16, 16), colour).save(tmp_path / f"{patient}_{cls}_{n}.png")
    out = tmp_path / "split.csv"
    result = cdft("prepare", "example-tiles", str(tmp_path), "-o", str(out))
    assert result.returncode == 0, result.stderr
    import pandas as pd

    table = pd.read_csv(out)
    assert len(table) == 24 and set(table["fold"]) == {0, 1, 2}
    assert table.groupby("patient")["fold"].nunique().max() == 1  # no patient in two folds
