"""Loading plugins through installed entry points: in-process copies of an installed plugin,
strict mode naming the failing plugin, and `cdft plugins` as the diagnosis in strict mode.

Entry points are real: fake distributions (dist-info with an ``entry_points.txt``) in a
temporary directory put on ``sys.path`` (in-process) or ``PYTHONPATH`` (a `cdft` subprocess).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cdft_core.registry import load_registry


def fake_distribution(site: Path, dist: str, module: str, source: str, entry_points: str) -> None:
    """A distribution with these ``[cdft]`` entry points (the foundation tests' helper)."""
    from test_cli_foundation import fake_distribution as install

    install(site, dist, module, source, "1.0", entry_points=entry_points)


TILES = """
from types import SimpleNamespace

from cdft_core import hookimpl

@hookimpl
def register_datasets(register):
    register("zz-x-tiles", dict, description="tiles of the plugin under test")

PLUGIN = SimpleNamespace(register_datasets=hookimpl(lambda register: register("zz-obj-tiles", dict)))
"""


# -- extra_plugins replace the installed entry point of the same plugin ------------------
@pytest.fixture
def installed(tmp_path, monkeypatch):
    """Module ``zz_epx_mod`` installed with the entry points ``x = zz_epx_mod`` and
    ``y = zz_epx_mod:PLUGIN``; yields the imported module."""
    fake_distribution(tmp_path, "zz-epx", "zz_epx_mod", TILES, "x = zz_epx_mod\ny = zz_epx_mod:PLUGIN")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("CDFT_DISABLE_PLUGINS", raising=False)
    module = importlib.import_module("zz_epx_mod")
    yield module
    sys.modules.pop("zz_epx_mod", None)


def load(monkeypatch, *extra, only="x"):
    """A strict registry of the entry point ``only`` (a clash would raise) and ``extra``."""
    monkeypatch.setenv("CDFT_PLUGINS", only)
    return load_registry(builtins=False, extra_plugins=list(extra), strict=True)


def test_the_entry_point_alone_registers_its_component(installed, monkeypatch):
    reg = load(monkeypatch)
    assert [p.name for p in reg.plugins] == ["x"] and reg.plugin("x").distribution == "zz-epx"
    assert reg.get("dataset", "zz-x-tiles").provider == "x"


def test_extra_plugin_of_the_same_name_and_module_replaces_the_entry_point(installed, monkeypatch):
    reg = load(monkeypatch, ("x", installed))
    assert [p.name for p in reg.plugins] == ["x"] and not reg.problems()
    assert [c.name for c in reg.list("datasets")] == ["zz-x-tiles"]
    assert reg.get("dataset", "zz-x-tiles").provider == "x"


def test_extra_plugin_of_the_same_module_under_another_name_replaces_it(installed, monkeypatch):
    reg = load(monkeypatch, ("mine", installed))
    assert [p.name for p in reg.plugins] == ["mine"] and not reg.problems()
    assert reg.get("dataset", "zz-x-tiles").provider == "mine"


def test_extra_plugin_that_is_an_entry_points_object_replaces_it(installed, monkeypatch):
    reg = load(monkeypatch, ("other", installed.PLUGIN), only="y")
    assert [p.name for p in reg.plugins] == ["other"] and not reg.problems()
    assert reg.get("dataset", "zz-obj-tiles").provider == "other"


def test_an_unrelated_extra_plugin_leaves_the_entry_point_loaded(installed, monkeypatch):
    from types import SimpleNamespace

    from cdft_core import hookimpl

    other = SimpleNamespace(register_strategies=hookimpl(lambda register: register("zz-probe", dict)))
    reg = load(monkeypatch, ("other", other))
    assert [p.name for p in reg.plugins] == ["x", "other"] and not reg.problems()


def test_the_documented_recipe_works_with_the_example_package_installed(monkeypatch):
    example = pytest.importorskip("cdft_plugin_example")
    for var in ("CDFT_PLUGINS", "CDFT_DISABLE_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    reg = load_registry(extra_plugins=[("mine", example)], strict=True)
    assert reg.get("dataset", "example-tiles").provider == "mine"
    assert reg.plugin("example") is None and not reg.problems()


# -- strict mode and `cdft plugins` in real processes -----------------------------------
LONG = "the strategy hook could not reach its configuration service " + "and gave up after many retries " * 4


def cdft(*args: str, site: Path, strict: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDFT_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    if strict:
        env["CDFT_STRICT_PLUGINS"] = "1"
    return subprocess.run([sys.executable, "-m", "cdft_cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    fake_distribution(
        site,
        "zz-half",
        "zz_half",
        f"""
        from cdft_core import hookimpl

        @hookimpl
        def register_datasets(register):
            register("zz-half-tiles", dict, description="registered before the failure")

        @hookimpl
        def register_strategies(register):
            raise ValueError({LONG!r})
        """,
        "zz-half = zz_half",
    )
    return site


def test_a_half_registered_plugin_lists_nothing(site):
    listing = cdft("list", "datasets", "zz-*", "--json", site=site)
    assert listing.returncode == 0, listing.stderr
    assert json.loads(listing.stdout) == []
    assert "zz-half" in listing.stderr  # the warning names the broken plugin


def test_strict_mode_error_names_the_plugin_hook_and_reason(site):
    result = cdft("list", site=site, strict=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"cdft: error: plugin 'zz-half' failed in register_strategies: ValueError: {LONG.strip()}"
    )
    assert "Traceback" not in result.stderr


def test_plugins_command_works_in_strict_mode_and_shows_whole_errors(site):
    table = cdft("plugins", site=site, strict=True)
    assert table.returncode == 0, table.stderr
    line = next(row for row in table.stdout.splitlines() if row.startswith("zz-half"))
    assert line.endswith(f"broken: in register_strategies: ValueError: {LONG.strip()}")
    assert len(line) > 120
    as_json = cdft("plugins", "--json", site=site, strict=True)
    assert as_json.returncode == 0, as_json.stderr
    info = {p["name"]: p for p in json.loads(as_json.stdout)}
    assert info["zz-half"]["status"] == "broken"
    assert info["zz-half"]["error"] == f"in register_strategies: ValueError: {LONG.strip()}"
