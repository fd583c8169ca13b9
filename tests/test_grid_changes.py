"""A grid cell edited after its directory was made: listed as ``changed``, refused before
anything runs, and back to done/started once the file matches again (or the directory goes)."""

from __future__ import annotations

import shutil

import pytest
import yaml
from helpers_engine import engine_data, invoke

from cdft_core.experiments.grid import cell_status, load_grid


def _grid(tmp_path, root: str, split: str, *, command: str = "run", full_lr: float = 1e30, **changes) -> str:
    """A tiny grid: test_vit at 32 px, one epoch of two steps; a linear cell and a full one."""
    settings = {"command": command, "output": str(tmp_path / "grid"), "dataset": "breakhis", "data_root": root,
                "split_file": split, "image_size": 32, "epochs": 1, "max_steps_per_epoch": 2, "pretrained": False,
                "batch_size": 8, "num_workers": 0, "device": "cpu", "tensorboard": False, "cache": False,
                "backbone": ["test_vit"], "strategy": ["linear", {"strategy": "full", "lr": full_lr}]}
    if command == "cv":
        settings["rotations"] = [0]
        settings["strategy"] = [settings["strategy"][1]]
    else:
        settings["val_fold"], settings["test_fold"] = 1, 3
    settings.update(changes)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return str(path)


def _states(path: str) -> list[str]:
    code, out, err = invoke("grid", path, "--dry-run")
    assert code == 0, err
    rows = out.split("\n\n")[0].splitlines()[2:]  # the table's rows, below its header and rule
    return [row.split("  ")[-1].strip() for row in rows]


@pytest.mark.slow
def test_an_edited_run_cell_is_refused_until_the_file_matches_or_its_directory_goes(tmp_path_factory, tmp_path):
    root, split = engine_data(tmp_path_factory)
    path = _grid(tmp_path, root, split)
    code, out, err = invoke("grid", path)
    assert code == 1 and "1 cell(s) ran, 0 were done already, 1 failed" in out, err  # lr 1e30: not finite

    _grid(tmp_path, root, split, full_lr=1e-4)  # the fix the failure asks for
    assert _states(path) == ["done", "changed (lr: 1e+30 -> 0.0001)"]
    log = tmp_path / "grid" / "test_vit-full.log"
    before = log.read_text()
    code, out, err = invoke("grid", path)
    message = err.strip().splitlines()[-1]
    assert code == 2 and message.startswith("cdft: error: cell 1 test_vit-full (lr: 1e+30 -> 0.0001) holds a run"), err
    assert f"remove {tmp_path / 'grid' / 'test_vit-full'} to run it anew" in message and "restore the grid file" in message
    assert log.read_text() == before  # refused before any cell started

    _grid(tmp_path, root, split, epochs=2)  # a done cell's options changed too
    assert _states(path) == ["changed (epochs: 1 -> 2)", "changed (epochs: 1 -> 2)"]
    _grid(tmp_path, root, split, log_every=7, num_workers=1)  # what a resume may change is no change
    assert _states(path) == ["done", "started"]

    shutil.rmtree(tmp_path / "grid" / "test_vit-full")
    _grid(tmp_path, root, split, full_lr=1e-4)
    code, out, err = invoke("grid", path)
    assert code == 0 and "1 cell(s) ran, 1 were done already, 0 failed" in out, err
    assert _states(path) == ["done", "done"]


@pytest.mark.slow
def test_a_cv_cell_is_compared_by_its_parents_configuration(tmp_path_factory, tmp_path):
    root, split = engine_data(tmp_path_factory)
    path = _grid(tmp_path, root, split, command="cv")
    code, out, err = invoke("grid", path)
    assert code == 1 and "1 failed" in out, err
    assert _states(path) == ["started"]

    _grid(tmp_path, root, split, command="cv", full_lr=1e-4, seed=2)
    grid = load_grid(path)
    assert cell_status(grid, grid.cells[0]) == ("changed", ["lr: 1e+30 -> 0.0001", "seed: 1 -> 2"])
    code, _, err = invoke("grid", path)
    assert code == 2 and "cell 0 test_vit-full (lr: 1e+30 -> 0.0001, seed: 1 -> 2) holds a run" in err
