"""`cdft run` input errors (one line, right exit code, nothing written), `cdft eval` and `cdft demo`."""

from __future__ import annotations

import json
import sys

import pytest
from helpers_engine import engine_data, invoke, quick_args, read_json, staged_output, staged_run


def _args(factory, tmp_path, strategy="linear", **replace: str) -> list[str]:
    root, split = engine_data(factory)
    args = quick_args(root, split, strategy=strategy, epochs=1) + ["--output", str(tmp_path / "run")]
    for option, value in replace.items():
        flag = "--" + option.replace("_", "-")
        args[args.index(flag) + 1] = value
    return args


def _assert_usage_error(code: int, err: str, *needles: str, exit_code: int = 2) -> None:
    assert code == exit_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cdft: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    ("replace", "extra", "needles"),
    [
        ({"backbone": "test_vitt"}, (), ("unknown backbone 'test_vitt'", "did you mean", "'test_vit")),
        ({"dataset": "breakhiss"}, (), ("unknown dataset 'breakhiss'", "'breakhis'")),
        ({"strategy": "stagd"}, (), ("unknown strategy 'stagd'", "'staged'")),
        ({"data_root": "/nonexistent/data"}, (), ("--data-root", "does not exist")),
        ({"batch_size": "0"}, (), ("--batch-size must be at least 1",)),
        ({"val_fold": "3"}, (), ("validation and test folds must differ",)),
        ({"val_fold": "7"}, ("--nproc-per-node", "2"), ("--val-fold 7 does not exist",)),  # before any worker
        ({"strategy": "frt"}, ("--adapter", "none"), ("trains the adapter", "--adapter cdtm")),
        ({}, ("--strategy-option", "speed=2"), ("does not take option", "speed")),
        ({}, ("--adapter-option", "depth=2"), ("adapter 'none' has no option depth",)),
        ({}, ("--dataset-option", "task=everything"), ("invalid value 'everything'",)),
        ({}, ("--device", "cuda"), ("no CUDA device",)),
        ({}, ("--precision", "fp16"), ("fp16 needs a CUDA device",)),
        ({}, ("--config", "/nonexistent.yaml"), ("config file", "not found")),
        ({}, ("--pretrained", "--weights", "/nonexistent.safetensors"), ("--weights", "does not exist")),
        ({}, ("--no-such-option",), ("No such option",)),
    ],
)
def test_bad_inputs(tmp_path_factory, tmp_path, replace, extra, needles):
    code, _, err = invoke(*_args(tmp_path_factory, tmp_path, **replace), *extra)
    _assert_usage_error(code, err, *needles)
    assert not (tmp_path / "run").exists()  # refused before any work


def test_output_not_writable_or_taken(tmp_path_factory, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    args = _args(tmp_path_factory, tmp_path)
    args[args.index("--output") + 1] = str(blocker / "run")
    code, _, err = invoke(*args)
    _assert_usage_error(code, err, "not writable", "a-file is a file")

    taken = staged_run(tmp_path_factory)
    args[args.index("--output") + 1] = str(taken)
    before = sorted(p.name for p in taken.rglob("*"))
    code, _, err = invoke(*args)
    _assert_usage_error(code, err, "already holds a complete run; choose a new directory")
    assert "--resume" not in err  # a complete run has nothing to continue: never suggest it
    assert sorted(p.name for p in taken.rglob("*")) == before  # never overwritten


def test_automatic_run_names_are_unique(tmp_path_factory, tmp_path):
    args = _args(tmp_path_factory, tmp_path)
    del args[args.index("--output") : args.index("--output") + 2]
    runs = tmp_path / "runs"
    for _ in range(2):
        code, _, err = invoke(*args, "--runs-dir", str(runs), "--max-steps-per-epoch", "1")
        assert code == 0, err
    names = sorted(p.name for p in runs.iterdir())
    assert len(names) == 2 and all(n.startswith("breakhis-test_vit-linear-v1t3-s1-") for n in names)


def test_help_lists_every_config_key():
    from cdft_core.config import FIELD_NAMES

    code, out, _ = invoke("run", "--help")
    assert code == 0
    for name in FIELD_NAMES:
        flag = {"dataset_options": "--dataset-option", "adapter_options": "--adapter-option",
                "strategy_options": "--strategy-option"}.get(name, "--" + name.replace("_", "-"))
        assert flag in out, flag
    for flag in ("--config", "--resume", "--nproc-per-node", "--nnodes", "--node-rank", "--rdzv-endpoint", "--no-pretrained"):
        assert flag in out
    headings = [line for line in out.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert [h.split(" ")[0] for h in headings] == ["Run:", "Data:", "Model:", "Strategy:", "Optimisation",
                                                       "Hardware:", "Output:", "Distributed", "Other:"], headings


def test_log_lines_without_a_terminal(tmp_path_factory, monkeypatch):
    from cdft_core.training.log import progress_bar

    _, err = staged_output(tmp_path_factory)
    assert "stage 2 epoch 2 step 3/3: loss" in err and "img/s" in err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert progress_bar(True, 3, 0, "x") is None
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = progress_bar(True, 3, 0, "x")
    assert bar is not None and bar.total == 3
    bar.close()
    assert progress_bar(False, 3, 0, "x") is None  # only rank 0 shows progress


def test_eval_matches_the_run(tmp_path_factory):
    run_dir = staged_run(tmp_path_factory)
    summary = read_json(run_dir / "summary.json")
    code, out, err = invoke("eval", str(run_dir))
    assert code == 0, err
    assert "stage2-full/best.safetensors" in out and "confusion matrix (test)" in out
    for split in ("test", "val"):
        code, out, err = invoke("eval", str(run_dir), "--split", split, "--json")
        assert code == 0, err
        result = json.loads(out)
        assert result["metrics"]["accuracy"] == summary[split]["accuracy"]
        assert result["metrics"]["confusion_matrix"] == summary[split]["confusion_matrix"]
    code, out, _ = invoke("eval", str(run_dir / "stage1-frt" / "best.safetensors"), "--split", "train", "--json")
    assert code == 0 and json.loads(out)["metrics"]["n"] == summary["images"]["train"]


def test_relative_paths_are_saved_absolute(tmp_path_factory, tmp_path, monkeypatch):
    """A run started with relative paths can be evaluated (and resumed) from another directory."""
    import os

    root, split = engine_data(tmp_path_factory)
    monkeypatch.chdir(os.path.dirname(split))
    args = quick_args(os.path.relpath(root), os.path.basename(split), strategy="linear", epochs=1)
    code, _, err = invoke(*args, "--max-steps-per-epoch", "1", "--output", str(tmp_path / "run"))
    assert code == 0, err
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert f"data_root: {root}" in saved and f"split_file: {split}" in saved
    monkeypatch.chdir(tmp_path)
    code, _, err = invoke("eval", "run", "--split", "val")
    assert code == 0, err


def test_ctrl_c_says_how_to_resume(tmp_path_factory, tmp_path, monkeypatch):
    import cdft_core.training.engine

    def interrupted(run, index):
        raise KeyboardInterrupt

    monkeypatch.setattr(cdft_core.training.engine, "train_stage", interrupted)
    code, _, err = invoke(*_args(tmp_path_factory, tmp_path))
    assert code == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("cdft: error: interrupted") and f"cdft run --resume {tmp_path / 'run'}" in last, err
    assert (tmp_path / "run" / "train.log").is_file() and not (tmp_path / "run" / "summary.json").exists()


def test_eval_errors(tmp_path):
    code, _, err = invoke("eval", str(tmp_path / "missing"))
    _assert_usage_error(code, err, "does not exist")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    code, _, err = invoke("eval", str(junk))
    _assert_usage_error(code, err, "not a readable safetensors file", exit_code=1)
    code, _, err = invoke("eval", str(tmp_path))
    _assert_usage_error(code, err, "holds no checkpoint")


@pytest.mark.slow
def test_demo(tmp_path):
    code, out, err = invoke("demo", "--output", str(tmp_path / "demo"), "--epochs", "1", "--max-steps-per-epoch", "2",
                            "--image-size", "32")
    assert code == 0, err
    assert "SYNTHETIC" in out and "RANDOM weights" in out
    assert "result: test metrics" in out and "tensorboard --logdir" in out
    runs = list((tmp_path / "demo" / "runs").iterdir())
    assert len(runs) == 1
    summary = read_json(runs[0] / "summary.json")
    assert summary["strategy"] == "staged" and summary["adapter"] == "cdtm" and summary["backbone"] == "test_vit"
    assert (tmp_path / "demo" / "breakhis-splits.csv").is_file()
