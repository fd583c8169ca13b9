"""Hostile or broken input ends `cdft run` with one line, the right exit code and nothing
left behind: YAML bombs and oversized config files, image sizes that cannot fit (the
backbone's patch, the memory), paths the filesystem cannot hold, archives that are not
archives, and an image that goes bad in the middle of a run (which stays resumable)."""

from __future__ import annotations

import re
import shutil
import sys
import textwrap

import pandas as pd
import pytest
from helpers_engine import REPO, engine_data, invoke, quick_args, run_subprocess, subprocess_env

GIB = 1 << 30


def _args(factory, tmp_path, **replace: str) -> list[str]:
    root, split = engine_data(factory)
    args = quick_args(root, split, strategy="linear", epochs=1) + ["--output", str(tmp_path / "run")]
    for option, value in replace.items():
        flag = "--" + option.replace("_", "-")
        args[args.index(flag) + 1] = value
    return args


def _one_line(code: int, err: str, *needles: str, exit_code: int = 2, limit: int = 400) -> str:
    """The single error line (checked: exit code, one line, no traceback, short, each needle in it)."""
    assert code == exit_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cdft: error: "), err
    assert "Traceback" not in err and "--debug" not in err
    assert len(lines[0]) <= limit, lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _refused(tmp_path, factory, extra: tuple[str, ...] = (), *needles: str, exit_code: int = 2, **replace: str) -> str:
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = invoke(*_args(factory, tmp_path, **replace), *extra)
    line = _one_line(code, err, *needles, exit_code=exit_code)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run directory, nothing else either
    return line


# -- 1. YAML: no anchors or aliases, bounded size, files only --------------------------------
_LEVELS = "abcdefghi"
#: nine levels of nine aliases each: 9**9 "lol"s (387 million) from ten lines
LAUGHS = "\n".join(
    ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"{name}: &{name} [{', '.join([f'*{below}'] * 9)}]" for below, name in zip(_LEVELS, _LEVELS[1:], strict=False)]
    + ["dataset_options: {task: *i}"]
)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (LAUGHS, "&a (line 1)"),  # a billion laughs: refused at the first anchor, nothing expanded
        ("batch_size: *nowhere\n", "*nowhere (line 1)"),
        ("base: &b {lr: 0.1}\nmore:\n  <<: *b\n", "&b (line 1)"),
        ("adapter_options:\n  depth: &d 2\n  width: *d\n", "&d (line 2)"),
    ],
    ids=["billion-laughs", "alias", "merge-key", "nested"],
)
def test_config_file_aliases_are_refused(tmp_path_factory, tmp_path, text, needle):
    preset = tmp_path / "bomb.yaml"
    preset.write_text(text)
    line = _refused(tmp_path, tmp_path_factory, ("--config", str(preset)), "config file", needle,
                    "no YAML anchors or aliases")
    assert "lol" not in line


def test_aliases_in_an_option_value_are_refused(tmp_path_factory, tmp_path):
    _refused(tmp_path, tmp_path_factory, ("--strategy-option", "x=[&a [1, 1], *a, *a]"), "--strategy-option x",
             "&a")


def test_config_file_size_and_kind(tmp_path_factory, tmp_path):
    from cdft_core.yaml_files import MAX_CONFIG_BYTES

    huge = tmp_path / "huge.yaml"
    huge.write_text("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    _refused(tmp_path, tmp_path_factory, ("--config", str(huge)), "larger than 1024 KiB")
    long_value = tmp_path / "long.yaml"
    long_value.write_text("batch_size: [" + ", ".join(["1"] * 100_000) + "]\n")  # under the bound, echoed short
    _refused(tmp_path, tmp_path_factory, ("--config", str(long_value)), "batch_size must be an integer", "…")
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 100_000 + "]" * 100_000 + "\n")
    _refused(tmp_path, tmp_path_factory, ("--config", str(deep)), "nested too deeply")
    folder = tmp_path / "presets"
    folder.mkdir()
    _refused(tmp_path, tmp_path_factory, ("--config", str(folder)), "is a directory", "pass a YAML file")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    _refused(tmp_path, tmp_path_factory, ("--config", str(binary)), "not UTF-8")


def test_plain_presets_still_load(tmp_path):
    from cdft_core.config import RunConfig, dump_yaml, load_yaml

    preset = tmp_path / "p.yaml"
    preset.write_text("dataset: breakhis  # a comment & an ampersand, * a star\nlr: 1.0e-3\n")
    assert load_yaml(str(preset)) == {"dataset": "breakhis", "lr": 1e-3}
    shared = {"depth": 2}  # one object twice: the saved config.yaml still has no anchor
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_yaml(RunConfig(adapter_options=shared, strategy_options=shared)))
    assert "&" not in saved.read_text() and load_yaml(str(saved))["strategy_options"] == shared


# -- 2. and 3. image sizes: the backbone's patch, and the memory -----------------------------
@pytest.mark.parametrize(
    ("backbone", "size", "needles"),
    [
        ("test_vit", "8", ("--image-size 8 is smaller than one patch", "patch 16 px", "use --image-size 16 or more")),
        ("test_convnext", "16", ("--image-size 16 is smaller than one patch", "total stride 32 px",
                                 "use --image-size 32 or more")),
        ("test_vit", "20", ("--image-size 20 does not fit backbone", "use --image-size 16 or 32")),
    ],
)
def test_image_size_below_one_patch(tmp_path_factory, tmp_path, backbone, size, needles):
    _refused(tmp_path, tmp_path_factory, (), *needles, backbone=backbone, image_size=size)


def test_image_size_too_large_for_memory(tmp_path_factory, tmp_path):
    line = _refused(tmp_path, tmp_path_factory, (), "--image-size 100000 with --batch-size 8 needs at least",
                    "tokens of width", "available RAM", image_size="100000")
    fit = int(re.search(r"use --image-size (\d+) or less", line)[1])
    assert 16 <= fit < 100_000 and fit % 16 == 0


def _config(backbone: str, image_size: int | None, batch_size: int, strategy: str = "staged"):
    from cdft_core.config import RunConfig

    return RunConfig(dataset="breakhis", data_root="/x", backbone=backbone, strategy=strategy, image_size=image_size,
                     batch_size=batch_size, device="cpu", precision="fp32")


def _strategy(name: str = "staged"):
    from cdft_core.strategy import build_strategy

    return build_strategy(name, {})


@pytest.mark.parametrize("backbone", ["vit_base_patch16_clip_224.laion2b", "convnext_base.fb_in22k"])
def test_the_paper_recipe_is_never_refused(backbone):
    """224 px, batch 32, fp32, the whole backbone trained: fits a machine with 8 GB (4 GiB free here)."""
    from cdft_core.training.preflight import check_memory

    check_memory(_config(backbone, 224, 32), _strategy(), "cpu", available=(4 * GIB, "test memory"))


def test_memory_refusal_names_values_that_fit():
    from cdft_core.errors import UsageError
    from cdft_core.training.preflight import check_memory

    available = (2 * GIB, "test memory")
    config = _config("test_vit", 4096, 64, strategy="full")
    with pytest.raises(UsageError) as caught:
        check_memory(config, _strategy("full"), "cpu", available=available)
    message = str(caught.value)
    assert "--image-size 4096 with --batch-size 64 needs at least" in message and "2.0 GiB test memory" in message
    fit = int(re.search(r"--image-size (\d+) or less", message)[1])
    batch = int(re.search(r"--batch-size (\d+)$", message)[1])
    assert fit % 16 == 0 and batch < 64
    check_memory(_config("test_vit", fit, 64, strategy="full"), _strategy("full"), "cpu", available=available)
    check_memory(_config("test_vit", 4096, batch, strategy="full"), _strategy("full"), "cpu", available=available)
    # a frozen backbone keeps no activations for a backward pass: the same size and batch need less
    frozen = _config("test_vit", 4096, 64, strategy="linear")
    check_memory(frozen, _strategy("linear"), "cpu", available=(64 * GIB, "test memory"))


# -- 4. paths the filesystem cannot hold --------------------------------------------------------
@pytest.mark.parametrize(
    ("option", "tail", "needle"),
    [
        ("--output", ("a" * 5000, "run"), "has a path component of 5000 bytes"),
        ("--output", ("b" * 200,) * 25, "PATH_MAX"),
        ("--runs-dir", ("c" * 200,) * 25, "PATH_MAX"),
    ],
    ids=["long-name", "long-path", "long-runs-dir"],
)
def test_paths_too_long(tmp_path_factory, tmp_path, option, tail, needle):
    args = _args(tmp_path_factory, tmp_path)
    if option == "--runs-dir":
        del args[args.index("--output"): args.index("--output") + 2]
    target = tmp_path.joinpath("out", *tail)
    code, _, err = invoke(*args, option, str(target))
    _one_line(code, err, option, needle)
    assert not (tmp_path / "out").exists()  # no parent folder was made


def test_resume_of_a_path_too_long(tmp_path):
    code, _, err = invoke("run", "--resume", str(tmp_path / ("r" * 5000)))
    _one_line(code, err, "run directory", "does not exist")


def test_failed_run_directory_creation_removes_its_folders(tmp_path, monkeypatch):
    from cdft_core.errors import CdftError
    from cdft_core.training import rundir

    def refuse(self, name, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rundir.RunDir, "write_bytes", refuse)
    with pytest.raises(CdftError, match="No space left on device"):
        rundir.create_run_dir(str(tmp_path / "a" / "b" / "run"), "runs", "x")
    assert list(tmp_path.iterdir()) == []


# -- 5. fsspec URLs: archives that are not archives, empty ones, folders --------------------------
def _archives(tmp_path):
    import tarfile
    import zipfile

    folder = tmp_path / "inputs"
    folder.mkdir()
    zipfile.ZipFile(folder / "empty.zip", "w").close()
    tarfile.open(folder / "empty.tar", "w").close()
    (folder / "zero.zip").write_bytes(b"")
    (folder / "table.csv").write_text("image_path,label,fold\n")
    (folder / "dir.zip").mkdir()
    return folder


@pytest.mark.parametrize(
    ("option", "url", "needles"),
    [
        ("--data-root", "zip://::{d}/empty.zip", ("the zip archive", "is empty")),
        ("--data-root", "tar://::{d}/empty.tar", ("the tar archive", "is empty")),
        ("--data-root", "zip://::{d}/zero.zip", ("is an empty file (0 bytes)",)),
        ("--data-root", "zip://BreaKHis_v1::{d}/table.csv", ("is not a zip archive",)),
        ("--data-root", "tar://BreaKHis_v1::{d}/table.csv", ("is not a tar archive",)),
        ("--data-root", "zip://BreaKHis_v1::{d}/dir.zip", ("is a folder, not a zip archive",)),
        ("--data-root", "zip://BreaKHis_v1::{d}/missing.zip", ("does not exist", "is missing")),
        ("--split-file", "zip://split.csv::{d}/table.csv", ("is not a zip archive",)),
        ("--config", "{d}/dir.zip", ("is a directory",)),
    ],
)
def test_archive_urls(tmp_path_factory, tmp_path, option, url, needles):
    folder = _archives(tmp_path)
    value = url.format(d=folder)
    replace = {option[2:].replace("-", "_"): value} if option != "--config" else {}
    extra = ("--config", value) if option == "--config" else ()
    _refused(tmp_path, tmp_path_factory, extra, option if option != "--config" else "config file", *needles,
             **replace)


def test_prepare_refuses_a_file_that_is_not_an_archive(tmp_path):
    folder = _archives(tmp_path)
    code, _, err = invoke("prepare", "breakhis", f"zip://BreaKHis_v1::{folder}/table.csv", "-o", str(tmp_path / "s.csv"))
    _one_line(code, err, "is not a zip archive")
    assert not (tmp_path / "s.csv").exists()


# -- 6. an image that goes bad in the middle of a run -----------------------------------------
#: runs cdft with a step hook that overwrites one image with garbage during stage 1, epoch 2
#: (what a failing disk or a careless sync does), as CDFT_TEST_FAULT's hooks run
_CORRUPTING_RUN = textwrap.dedent(
    """
    import shutil, sys

    import cdft_core.training.engine as engine

    target, garbage = sys.argv[1], sys.argv[2]

    def hook_from_env(rank):
        def hook(stage, epoch, step):
            if (stage, epoch, step) == (1, 2, 1):
                shutil.copyfile(garbage, target)
        return hook

    engine.step_hook_from_env = hook_from_env
    from cdft_cli.main import main

    main(sys.argv[3:])
    """
)


def test_an_image_that_goes_bad_mid_run_leaves_a_resumable_run(tmp_path_factory, tmp_path):
    import subprocess

    root, split = engine_data(tmp_path_factory)
    data = tmp_path / "data" / "BreaKHis_v1"
    shutil.copytree(root, data)  # ours to break
    table = pd.read_csv(split)
    victim = table[table["fold"] == 1]["image_path"].iloc[0]  # a validation image: read after every epoch
    image = data / victim
    good = image.read_bytes()
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a PNG any more")
    run_dir = tmp_path / "run"
    args = quick_args(str(data), split, strategy="full", epochs=2)
    args[args.index("--num-workers") + 1] = "1"  # the error comes back from a loader worker
    command = [sys.executable, "-c", _CORRUPTING_RUN, str(image), str(garbage), *args, "--no-cache",
               "--output", str(run_dir)]
    done = subprocess.run(command, env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("cdft: error:")]
    assert len(errors) == 1 and done.stderr.strip().endswith(errors[0]), done.stderr
    assert "Traceback" not in done.stderr and "DataLoader worker" not in done.stderr
    line = errors[0]
    assert f"cannot decode image {victim!r}" in line and "replace or remove the file" in line
    assert line.endswith(f"then continue with `cdft run --resume {run_dir}`"), line
    assert "stage 1 epoch 2" in done.stderr  # it trained epoch 2 before the validation met the image
    assert not (run_dir / "summary.json").exists()
    assert [p.name for p in (run_dir / "resume").glob("*.json")] == ["s00-e00001-b0000000.json"]

    image.write_bytes(good)  # fixed
    resumed = run_subprocess("run", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and "after stage 1, epoch 1" in resumed.stderr
    assert (run_dir / "summary.json").is_file()


def test_a_bad_image_before_training_leaves_no_run_directory(tmp_path_factory, tmp_path):
    root, split = engine_data(tmp_path_factory)
    data = tmp_path / "data" / "BreaKHis_v1"
    shutil.copytree(root, data)
    victim = pd.read_csv(split)["image_path"].iloc[0]
    (data / victim).write_bytes(b"")
    args = _args(tmp_path_factory, tmp_path, data_root=str(data))
    code, _, err = invoke(*args)
    _one_line(code, err, f"cannot decode image {victim!r}", "the file is empty", exit_code=1)
    assert not (tmp_path / "run").exists()


def test_a_worker_copy_of_an_image_error_keeps_one_line():
    from cdft_core.data.root import ImageError

    report = ("Caught ImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
              '  File "x.py", line 1, in <module>\n    f()\n'
              "cdft_core.data.root.ImageError: cannot decode image 'a.png' (truncated); replace or remove the file\n")
    assert str(ImageError(report)) == "cannot decode image 'a.png' (truncated); replace or remove the file"
    assert str(ImageError("plain")) == "plain"


# -- unknown names: one suggestion each, no unrelated notes ----------------------------------------
@pytest.mark.parametrize(
    ("replace", "expected"),
    [
        ({"dataset": "breakhs"}, "unknown dataset 'breakhs'; did you mean 'breakhis'?"),
        ({"strategy": "stage"}, "unknown strategy 'stage'; did you mean 'staged', 'staged-lora'?"),
    ],
)
def test_unknown_names_suggest_each_name_once(tmp_path_factory, tmp_path, replace, expected):
    line = _refused(tmp_path, tmp_path_factory, (), **replace)
    assert line == f"cdft: error: {expected}"


def test_a_backbone_that_cannot_be_measured_is_left_to_the_real_build(monkeypatch):
    """A plugin backbone whose constructor does not run on the meta device is not refused."""
    from cdft_core.training import preflight

    def cannot(*args, **kwargs):
        raise TypeError("this constructor needs real tensors")

    monkeypatch.setattr(preflight, "_build_meta", cannot)
    assert preflight.input_cost("test_vit", 64) is None
    assert preflight.input_cost("test_vit", None) is None
