"""Runs launched through torchrun's launcher on CPU (gloo): two processes give the same
evaluation metrics as one, a failing rank ends the job promptly, two launchers form one
job over a c10d rendezvous on 127.0.0.1 (the multi-node path on one machine)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import torch
from helpers_engine import (
    REPO,
    cdft_command,
    comparable,
    engine_data,
    free_port,
    invoke,
    quick_args,
    read_json,
    run_subprocess,
    staged_args,
    subprocess_env,
)

from cdft_core.training.distributed import DistInfo, gather_predictions

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


_RUNS: dict[str, tuple] = {}


def _two_process_run(factory) -> tuple:
    """A completed 2-process staged run: (run directory, finished process), once per test process."""
    if "two" not in _RUNS:
        root, split = engine_data(factory)
        run_dir = factory.mktemp("two-processes") / "run"
        done = run_subprocess(*staged_args(root, split), "--output", str(run_dir), "--nproc-per-node", "2")
        assert done.returncode == 0, done.stderr[-3000:]
        _RUNS["two"] = (run_dir, done)
    return _RUNS["two"]


def test_two_processes_match_one_process_evaluation(tmp_path_factory):
    """A 2-process staged run (fresh DDP wrapper per stage) reports exactly the metrics that a
    1-process evaluation of its checkpoints gives on the same 9-image (odd: padded) splits."""
    run_dir, done = _two_process_run(tmp_path_factory)
    summary = read_json(run_dir / "summary.json")
    assert summary["world_size"] == 2 and [s["name"] for s in summary["stages"]] == ["frt", "full"]
    assert "2 processes on cpu" in done.stderr and "result: test metrics" in done.stdout
    assert done.stdout.count("result: test metrics") == 1  # only rank 0 prints

    for stage in summary["stages"]:
        for split_name in ("val", "test"):
            code, out, err = invoke("eval", str(run_dir / stage["checkpoint"]), "--split", split_name, "--json")
            assert code == 0, err
            single = json.loads(out)["metrics"]
            assert single["n"] == 9
            assert comparable(single) == comparable(stage[split_name])
            assert single["loss"] == stage[split_name]["loss"]  # the run's batch layout: bit for bit


def test_two_process_predictions_match_one_process(tmp_path_factory):
    """Each stage's predictions.csv of the 2-process run lists every image once, in split
    order, with what a 1-process evaluation of its checkpoint predicts for it."""
    import numpy as np
    import pandas as pd

    from cdft_core.training.evaluation import evaluate_checkpoint

    run_dir, _ = _two_process_run(tmp_path_factory)
    summary = read_json(run_dir / "summary.json")
    probs = [f"prob_{c}" for c in summary["classes"]]
    for stage in summary["stages"]:
        frame = pd.read_csv(run_dir / stage["checkpoint"].replace("best.safetensors", "predictions.csv"),
                            dtype={"group": str, "image_path": str}, keep_default_na=False)
        for split_name in ("val", "test"):
            rows = frame[frame["split"] == split_name]
            single = evaluate_checkpoint(str(run_dir / stage["checkpoint"]), split=split_name, device="cpu")
            assert len(rows) == single.metrics["n"] == 9
            assert rows["predicted"].tolist() == single.predictions.probabilities().argmax(1).tolist()
            assert rows["label"].tolist() == single.predictions.labels.tolist()
            assert np.allclose(rows[probs].to_numpy(), single.predictions.probabilities(), atol=1e-6)
            assert (rows["predicted"] == rows["label"]).mean() == pytest.approx(stage[split_name]["accuracy"], abs=1e-12)
            assert single.metrics["patient_accuracy"] == stage[split_name]["patient_accuracy"]


def test_sigterm_on_one_rank_stops_all_and_resume_matches(tmp_path_factory, tmp_path):
    """Preemption of a 2-process run: every rank stops at the same step, one state is saved,
    the launcher exits 143; resumed with 2 processes the run ends exactly as the uninterrupted one."""
    reference, _ = _two_process_run(tmp_path_factory)
    root, split = engine_data(tmp_path_factory)
    run_dir = tmp_path / "run"
    # 24 training images, 2 processes, batch 8: 2 steps per epoch; rank 0 gets SIGTERM after the first
    env = subprocess_env(CDFT_TEST_FAULT="rank=0,stage=2,epoch=1,step=1,action=sigterm")
    done = run_subprocess(*staged_args(root, split), "--output", str(run_dir), "--nproc-per-node", "2", env=env)
    assert done.returncode == 143, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("cdft: error: ")]
    assert len(errors) == 1, done.stderr[-3000:]  # one line for the job, not one per rank
    assert errors[0].startswith("cdft: error: stopped by SIGTERM at stage 2, epoch 1, step 1")
    assert not re.search(r"^[EW]\d{4} ", done.stderr, re.M), done.stderr[-3000:]  # no torch elastic log lines
    assert [p.name for p in (run_dir / "resume").glob("*.json")] == ["s01-e00000-b0000001.json"]
    resumed = run_subprocess("run", "--resume", str(run_dir), "--nproc-per-node", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_json(run_dir / "summary.json")["test"] == read_json(reference / "summary.json")["test"]
    assert (run_dir / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()


def test_failing_rank_ends_the_job_promptly(tmp_path_factory, tmp_path):
    root, split = engine_data(tmp_path_factory)
    env = subprocess_env(CDFT_TEST_FAULT="rank=1,stage=1,epoch=1,step=2,action=raise")
    start = time.time()
    done = run_subprocess(*quick_args(root, split, strategy="full", epochs=2), "--output", str(tmp_path / "run"),
                          "--nproc-per-node", "2", env=env, timeout=90)
    elapsed = time.time() - start
    assert done.returncode == 1
    assert elapsed < 60
    last = done.stderr.strip().splitlines()[-1]
    # the failing rank is named first, with its own error (the agent may have SIGTERMed it
    # while it was exiting); the rank that only lost its peer comes after it
    assert re.match(r"cdft: error: distributed run failed: rank 1 (exited with code 1|was killed by SIGTERM): "
                    r"injected test fault", last), last
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower() or re.match(r"[EW]\d{4} ", line)]
    assert errors == [last], done.stderr[-3000:]  # one line for the job: no per-rank lines, no torch log lines
    assert not (tmp_path / "run" / "summary.json").exists()


def test_two_launchers_form_one_job_over_c10d(tmp_path_factory, tmp_path):
    """The multi-node path on one machine: two launchers with --nnodes 2, one process each, a c10d
    rendezvous on 127.0.0.1. One "node" is `cdft run --nnodes 2 ...`, the other an external
    `torchrun ... -m cdft_cli run ...` (as on a cluster): both join the same job."""
    root, split = engine_data(tmp_path_factory)
    endpoint = f"127.0.0.1:{free_port()}"
    run_args = quick_args(root, split, strategy="linear", epochs=1) + ["--output", str(tmp_path / "run")]
    ours = cdft_command(*run_args, "--nproc-per-node", "1", "--nnodes", "2", "--node-rank", "0",
                        "--rdzv-endpoint", endpoint, "--rdzv-id", "two-launchers")
    external = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--nnodes", "2",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "two-launchers",
                "-m", "cdft_cli", *run_args]
    procs = [subprocess.Popen(command, env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for command in (ours, external)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    summary = read_json(tmp_path / "run" / "summary.json")
    assert summary["world_size"] == 2
    assert sum("result: test metrics" in out for out, _ in outputs) == 1  # one rank 0 in the whole job


def test_gather_drops_sampler_padding_and_orders_by_index():
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    # what two ranks of a padded DistributedSampler produce for 5 images: 0,2,4 | 1,3,0(pad)
    indices = torch.tensor([0, 2, 4, 1, 3, 0])
    labels = torch.tensor([0, 0, 1, 1, 0, 0])
    logits = torch.arange(12, dtype=torch.float32).view(6, 2)
    idx, lab, out = gather_predictions(indices, labels, logits, info, dataset_size=5)
    assert idx.tolist() == [0, 1, 2, 3, 4]
    assert lab.tolist() == [0, 1, 0, 0, 1]
    assert out[:, 0].tolist() == [0, 6, 2, 8, 4]


def test_launcher_options_are_checked_before_launching(tmp_path_factory, tmp_path):
    root, split = engine_data(tmp_path_factory)
    base = quick_args(root, split, strategy="linear", epochs=1) + ["--output", str(tmp_path / "run")]
    code, _, err = invoke(*base, "--nnodes", "2")
    assert code == 2 and "--rdzv-endpoint" in err
    code, _, err = invoke(*base, "--nproc-per-node", "zero")
    assert code == 2 and "--nproc-per-node" in err
    code, _, err = invoke(*base, "--nproc-per-node", "2", "--rdzv-endpoint", "nohost")
    assert code == 2 and "HOST:PORT" in err
    assert not (tmp_path / "run").exists()
