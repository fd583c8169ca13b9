"""Shared data for the dataset tests: synthetic trees built once per test process, an
in-process CLI runner, and the data config the transforms are built from.

The trees are cached in this module (not in a fixture) so every test module reuses the
same files: building them is the slowest part of the dataset tests.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import pytest

_CACHE: dict[str, Any] = {}

#: A data config as a backbone would give it (tiny images keep the tests fast).
DATA_CONFIG = {
    "input_size": (3, 32, 32),
    "mean": (0.5, 0.4, 0.3),
    "std": (0.2, 0.25, 0.3),
    "interpolation": "bicubic",
    "source": "test",
}


def _base(factory: pytest.TempPathFactory) -> Path:
    if "base" not in _CACHE:
        _CACHE["base"] = factory.mktemp("cdft-data")
    return _CACHE["base"]


def breakhis_root(factory: pytest.TempPathFactory) -> str:
    """The default synthetic BreakHis tree (8 types x 3 patients x 4 mags x 4 images + traps)."""
    if "breakhis" not in _CACHE:
        from cdft_core.data.synthetic import make_synthetic_breakhis

        _CACHE["breakhis"] = make_synthetic_breakhis(str(_base(factory) / "full"), seed=0)
    return _CACHE["breakhis"]


def small_breakhis_root(factory: pytest.TempPathFactory) -> str:
    """A smaller tree (2 patients per type, 1 image per magnification) for the fsspec tests."""
    if "small" not in _CACHE:
        from cdft_core.data.synthetic import make_synthetic_breakhis

        _CACHE["small"] = make_synthetic_breakhis(
            str(_base(factory) / "small"), seed=3, patients_per_type=2, images_per_magnification=1
        )
    return _CACHE["small"]


def hcrf_root(factory: pytest.TempPathFactory) -> str:
    if "hcrf" not in _CACHE:
        from cdft_core.data.synthetic import make_synthetic_hcrf

        _CACHE["hcrf"] = make_synthetic_hcrf(str(_base(factory) / "hcrf"), seed=0)
    return _CACHE["hcrf"]


def zip_tree(root: str, archive: Path) -> str:
    """Zip the folder ``root`` (keeping its own name as top folder); return the zip:// URL."""
    top = Path(root)
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(top.rglob("*")):
            if path.is_file():
                zf.write(path, f"{top.name}/{path.relative_to(top).as_posix()}")
    return f"zip://{top.name}::{archive}"


def copy_to_memory(root: str, name: str) -> str:
    """Copy a local tree into fsspec's memory filesystem; return the memory:// URL."""
    import fsspec

    memory = fsspec.filesystem("memory")
    top = Path(root)
    for path in sorted(top.rglob("*")):
        if path.is_file():
            memory.pipe_file(f"/{name}/{path.relative_to(top).as_posix()}", path.read_bytes())
    return f"memory://{name}"


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``cdft ARGS`` in this process; return (exit code, stdout, stderr)."""
    from cdft_cli.main import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err
