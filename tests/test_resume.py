"""Interrupted runs resume exactly: kill -9 in the middle of an epoch of stage 2, and SIGTERM
(preemption) in the middle of an epoch of stage 1 (with 2 loader workers, the reference has
none), both end with the metrics of the uninterrupted run; an interrupted run has no
summary.json."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest
import yaml
from helpers_engine import (
    REPO,
    cdft_command,
    engine_data,
    invoke,
    metric_lines,
    read_json,
    run_subprocess,
    staged_args,
    staged_run,
    subprocess_env,
)

pytestmark = pytest.mark.slow


def _assert_same_results(run_dir, reference) -> None:
    ours, theirs = read_json(run_dir / "summary.json"), read_json(reference / "summary.json")
    for key in ("val", "test", "best_epoch", "best_stage"):
        assert ours[key] == theirs[key], key
    assert [s["test"] for s in ours["stages"]] == [s["test"] for s in theirs["stages"]]
    assert metric_lines(run_dir) == metric_lines(reference)  # every epoch of every stage, exactly


def _scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    return [(e.step, round(e.value, 5)) for e in ea.Scalars(tag)]


def test_kill_9_mid_epoch_then_resume_matches_uninterrupted(tmp_path_factory, tmp_path):
    reference = staged_run(tmp_path_factory)
    root, split = engine_data(tmp_path_factory)
    run_dir = tmp_path / "run"
    log = tmp_path / "stderr.txt"
    env = subprocess_env(CDFT_TEST_FAULT="stage=2,epoch=1,step=2,action=stall")
    with open(log, "w") as stderr:
        proc = subprocess.Popen(cdft_command(*staged_args(root, split), "--output", str(run_dir)), env=env, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.time() + 90
        while "cdft-test-fault: stalled" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.time() < deadline, "the run never reached the injected stall"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)  # in the middle of stage 2's first epoch
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists()  # an incomplete run has no summary
    assert (run_dir / "stage1-frt" / "best.safetensors").is_file()

    # the data moved meanwhile: a resume may say where they live now (nothing else may change)
    moved = tmp_path / "moved" / "BreaKHis_v1"
    shutil.copytree(root, moved)
    code, out, err = invoke("run", "--resume", str(run_dir), "--data-root", str(moved))
    assert code == 0, err
    assert "resuming" in err and "after stage 1, epoch 2" in err
    _assert_same_results(run_dir, reference)
    # the last completed epoch's events survive the resume (the purge starts after its step)
    for tag in ("val/accuracy", "train/loss", "train/stage", "test/accuracy", "test/stage"):
        assert _scalars(run_dir, tag) == _scalars(reference, tag), tag
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data_root"] == str(moved)


def test_sigterm_saves_mid_epoch_state_and_resume_matches(tmp_path_factory, tmp_path):
    reference = staged_run(tmp_path_factory)
    root, split = engine_data(tmp_path_factory)
    run_dir = tmp_path / "run"
    env = subprocess_env(CDFT_TEST_FAULT="stage=1,epoch=2,step=2,action=sigterm")
    args = staged_args(root, split)
    args[args.index("--num-workers") + 1] = "2"  # augmentation does not depend on the loader workers either
    done = run_subprocess(*args, "--output", str(run_dir), env=env)
    assert done.returncode == 143, done.stderr
    assert "stopped by SIGTERM" in done.stderr and f"cdft run --resume {run_dir}" in done.stderr
    assert "Traceback" not in done.stderr
    states = sorted(p.name for p in (run_dir / "resume").glob("*.json"))
    assert states == ["s00-e00001-b0000002.json"]  # stage 1, 1 epoch done, 2 steps into the next
    assert not (run_dir / "summary.json").exists()

    # a subprocess: the loader workers fork, which is unsafe in a test process that has
    # imported jax (multithreaded) in an earlier test
    resumed = run_subprocess("run", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert "2 steps of epoch 2" in resumed.stderr
    _assert_same_results(run_dir, reference)


def test_resume_refuses_changes_and_complete_runs(tmp_path_factory):
    reference = staged_run(tmp_path_factory)
    code, _, err = invoke("run", "--resume", str(reference), "--lr", "0.1")
    assert code == 2 and "drop --lr" in err
    code, _, err = invoke("run", "--resume", str(reference))
    assert code == 2 and "is complete" in err
    code, _, err = invoke("run", "--resume", str(reference / "nowhere"))
    assert code == 2 and "does not exist" in err
