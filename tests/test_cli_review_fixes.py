"""Review fixes of the CLI: demo checks its options before writing, a grid's values are checked
when the file is read, cv hides the folds it chooses, `-o` wherever `--output` is, run/cv name
`--num-workers` in its error, a closed pipe is no failure, a --cache-dir that is a file is a
usage error, and two help/warning texts say what the command does."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers_engine import REPO, cdft_command, engine_data, invoke, subprocess_env

GRID = """command: run
output: {output}
dataset: breakhis
data_root: {root}
backbone: test_vit
{extra}
strategy: [linear, frt]
"""


def _grid(tmp_path: Path, extra: str, root: str = "no/such/data") -> str:
    path = tmp_path / "g.yaml"
    path.write_text(GRID.format(output=tmp_path / "cells", root=root, extra=extra))
    return str(path)


# -- 1: demo writes nothing before every option is checked -------------------------------------
@pytest.mark.parametrize("option", [("--epochs", "0"), ("--image-size", "4"), ("--max-steps-per-epoch", "0")])
def test_demo_refuses_a_bad_option_before_writing_anything(tmp_path, option):
    workdir = tmp_path / "demo"
    code, out, err = invoke("demo", *option, "--output", str(workdir))
    assert code == 2, err
    assert f"cdft: error: {option[0]}" in err, err
    assert not workdir.exists(), sorted(p.name for p in workdir.iterdir())


# -- 2: a grid's values fail when the file is read ------------------------------------------------
@pytest.mark.parametrize(("extra", "needle"), [("epochs: 0", "--epochs must be at least 1, got 0"),
                                               ("batch_size: -3", "--batch-size must be at least 1, got -3")])
@pytest.mark.parametrize("mode", ["--dry-run", "--print-commands"])
def test_a_grid_value_cdft_run_refuses_fails_when_the_file_is_read(tmp_path, extra, needle, mode):
    code, out, err = invoke("grid", _grid(tmp_path, extra), mode)
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and "cell 0 (linear)" in err and needle in err, err
    assert out == ""


def test_a_grid_whose_data_are_elsewhere_still_lists(tmp_path):
    # paths and names are the cells' to check where they run: only the values are judged here
    code, out, err = invoke("grid", _grid(tmp_path, "epochs: 2\nsplit_file: no/such.csv"), "--dry-run")
    assert code == 0, err
    assert "2 cells" in out


# -- 3: cv hides the folds each rotation chooses --------------------------------------------------
def test_cv_help_hides_the_folds_but_still_refuses_them_with_the_reason():
    code, out, _ = invoke("cv", "--help")
    assert code == 0 and "--val-fold" not in out and "--test-fold" not in out, out
    code, out, _ = invoke("run", "--help")
    assert "--val-fold" in out and "--test-fold" in out  # cdft run keeps them
    code, _, err = invoke("cv", "--val-fold", "2")
    assert code == 2 and "sets the validation and test fold of each rotation" in err, err


# -- 4: -o wherever --output is --------------------------------------------------------------------
@pytest.mark.parametrize("command", ["run", "cv", "probe", "demo"])
def test_o_is_the_short_form_of_output(tmp_path, command):
    extra = ("--epochs", "0") if command == "demo" else ()
    code, _, err = invoke(command, "-o", str(tmp_path / "out"), *extra)
    assert code == 2, err
    assert "No such option" not in err, err
    assert not (tmp_path / "out").exists()


def test_grid_takes_o(tmp_path):
    code, out, err = invoke("grid", _grid(tmp_path, ""), "-o", str(tmp_path / "elsewhere"), "--dry-run")
    assert code == 0, err
    assert f"directories under {tmp_path / 'elsewhere'}" in out


# -- 5: run and cv name --num-workers -------------------------------------------------------------
@pytest.mark.parametrize("command", ["run", "cv", "probe"])
def test_a_bad_num_workers_is_named_as_the_option(tmp_path, command):
    code, _, err = invoke(command, "--dataset", "breakhis", "--data-root", str(tmp_path), "--backbone", "test_vit",
                          "--num-workers", "-1")
    assert code == 2
    assert "cdft: error: --num-workers must be auto or a number" in err, err
    assert "command line" not in err


# -- 6: a reader that stops reading -----------------------------------------------------------------
@pytest.mark.parametrize("args", [("list", "backbones", "--all"), ("grid", "GRID", "--print-commands"),
                                  ("run", "--help")])
def test_a_closed_pipe_exits_0_quietly(tmp_path, args):
    args = tuple(_grid(tmp_path, "") if a == "GRID" else a for a in args)
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line: every write meets EPIPE
    try:
        done = subprocess.run(cdft_command(*args), stdout=write, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env=subprocess_env(), timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no error line, no "Exception ignored ... BrokenPipeError"


# -- 7: --cache-dir that is a file ------------------------------------------------------------------
@pytest.mark.parametrize("sub", ["list", "clear"])
def test_cache_commands_refuse_a_cache_dir_that_is_a_file_and_accept_a_missing_one(tmp_path, sub):
    a_file = tmp_path / "split.csv"
    a_file.write_text("x\n")
    code, out, err = invoke("cache", sub, "--cache-dir", str(a_file))
    assert code == 2 and "is a file, not a folder" in err, (out, err)
    code, out, err = invoke("cache", sub, "--cache-dir", str(tmp_path / "missing"))
    assert code == 0, err
    assert "no caches" in out or "removed 0 caches" in out


def test_run_with_a_cache_dir_that_is_a_file_advises_another_folder(tmp_path_factory, tmp_path):
    root, split = engine_data(tmp_path_factory)
    code, _, err = invoke("run", "--dataset", "breakhis", "--data-root", root, "--split-file", split,
                          "--backbone", "test_vit", "--no-pretrained", "--image-size", "32", "--device", "cpu",
                          "--cache-dir", split, "--output", str(tmp_path / "run"))
    assert code == 2, err
    assert "is a file, not a folder; pass another folder" in err, err
    assert "pass --cache-dir" not in err
    assert not (tmp_path / "run").exists()


# -- 8: help and warning texts ----------------------------------------------------------------------
def test_make_synthetic_help_names_every_json_key():
    code, out, _ = invoke("make-synthetic", "--help")
    assert code == 0 and "{kind, root, seed}" in out, out


def test_demo_warnings_point_at_no_json_option(tmp_path, monkeypatch):
    from cdft_core.training import engine

    monkeypatch.setattr(engine, "main", lambda config: None)  # the warnings come before training
    code, _, err = invoke("demo", "--epochs", "1", "--image-size", "32", "--output", str(tmp_path / "demo"))
    assert code == 0, err
    assert "set(s) of byte-identical images" in err and " more" in err, err
    assert "--json" not in err
