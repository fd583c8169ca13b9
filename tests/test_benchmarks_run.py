"""The benchmark scripts run end to end at their tiniest settings and refuse bad options.

Each script runs as a subprocess, as a user (or ``gpu_smoke.sh``) runs it: a script that
crashes on its first call, prints a non-JSON ``--json``, or answers a typo with a traceback
is what these tests catch. The timings themselves are not checked (a shared CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def bench(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``benchmarks/<script>`` with this interpreter, one thread, offline."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=BENCHMARKS.parent)


def json_of(result: subprocess.CompletedProcess) -> object:
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)  # the whole stdout: nothing but the JSON


# -- each script at its tiniest settings ---------------------------------------------------------
@pytest.mark.slow
def test_frozen_times_every_part_of_a_run():
    """frozen.py patched ``engine.evaluate``, which no longer exists: it crashed before timing anything."""
    out = json_of(bench("frozen.py", "--images", "1", "--epochs", "2", "--threads", "1", "--views", "1",
                        "--strategy", "linear", "--json"))
    plain, cached = out["runs"]
    assert (plain["feature_cache"], cached["feature_cache"]) == (False, True)
    for row in (plain, cached):
        assert row["epoch_s"] > 0 and row["eval_s"] > 0 and 0 <= row["test_accuracy"] <= 1
    assert cached["build_s"] > 0 and plain["build_s"] == 0
    assert {"epoch_speedup", "eval_speedup"} <= cached.keys()
    assert plain["test_accuracy"] == cached["test_accuracy"]  # the cache changes no evaluation


@pytest.mark.slow
def test_train_step_tiny_row():
    out = json_of(bench("train_step.py", "--device", "cpu", "--backbones", "test_vit", "--strategies", "linear",
                        "--batch-sizes", "2", "--image-size", "32", "--steps", "1", "--warmup", "0", "--json"))
    (row,) = out["rows"]
    assert "error" not in row and row["img_s"] > 0 and row["warmup_s"] == 0
    assert {"torch", "device"} <= out["machine"].keys()


@pytest.mark.slow
def test_train_step_fails_when_every_row_fails():
    result = bench("train_step.py", "--device", "cpu", "--backbones", "nope", "--strategies", "linear",
                   "--batch-sizes", "2", "--json")
    assert result.returncode == 1
    assert all("error" in row for row in json.loads(result.stdout)["rows"])  # still the JSON, with each error
    assert "every row failed" in result.stderr.splitlines()[-1]


@pytest.mark.slow
def test_cdtm_tiny():
    (row,) = json_of(bench("cdtm.py", "--shape", "convnext_b", "--repeats", "1", "--json"))
    assert row["shape"] == "convnext_b" and row["ours_ms"] > 0 and "mixing" in row


@pytest.mark.slow
def test_probe_tiny():
    out = json_of(bench("probe.py", "--images", "16", "--val-images", "8", "--dim", "8", "--epochs", "1",
                        "--repeats", "1", "--threads", "1", "--json"))
    assert out["steps"] == 2 and out["one_head_s"] > 0 and out["twelve_heads_s"] > 0


@pytest.mark.slow
def test_pipeline_tiny():
    (row,) = json_of(bench("pipeline.py", "--size", "700x460", "--images", "1", "--repeats", "1",
                           "--input-size", "32", "--json"))
    assert row["images"] == 1 and row["identical"] is True and row["cached_img_s"] > 0


@pytest.mark.slow
def test_foundation_finetune_tiny():
    out = json_of(bench("foundation_finetune.py", "--backbones", "test_vit", "--modes", "full", "--batches", "2",
                        "--steps", "1", "--warmup", "0", "--json"))
    (row,) = out["rows"]
    assert row["mode"] == "full" and row["img_s"] > 0 and row["trainable"] > 0


# -- bad options: one usage error, exit 2, no traceback --------------------------------------------
@pytest.mark.parametrize("script, args, words", [
    ("cdtm.py", ["--device", "foo"], "--device"),
    ("cdtm.py", ["--repeats", "0", "--json"], "--repeats 0"),
    ("probe.py", ["--images", "0"], "--images 0"),
    ("train_step.py", ["--batch-sizes", "abc"], "--batch-sizes"),
    ("train_step.py", ["--steps", "0"], "--steps 0"),
    ("pipeline.py", ["--augment", "bogus"], "--augment"),
    ("pipeline.py", ["--images", "0"], "--images 0"),
    ("foundation_finetune.py", ["--modes", "full,bogus"], "bogus"),
    ("foundation_finetune.py", ["--precision", "fp64"], "--precision"),
])
def test_bad_option_is_one_usage_error(script, args, words):
    result = bench(script, *args, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and words in errors[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.skipif(sys.platform == "win32", reason="bash")
def test_cuda_without_a_gpu_is_a_usage_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    for script in ("cdtm.py", "probe.py", "train_step.py"):
        result = bench(script, "--device", "cuda", timeout=60)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (script, result.stderr)
        assert "no CUDA device" in result.stderr.splitlines()[-1]


# -- gpu_smoke.sh ----------------------------------------------------------------------------------
def smoke(out_dir: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    settings = {**os.environ, "PYTHON": sys.executable, "SMOKE_PRECISIONS": "fp32", "SMOKE_BACKBONES": "test_vit",
                "SMOKE_STRATEGIES": "linear", "SMOKE_LARGE": "0", **env}
    return subprocess.run(["bash", str(BENCHMARKS / "gpu_smoke.sh"), out_dir], capture_output=True, text=True,
                          timeout=60, env=settings, cwd=cwd)


def test_gpu_smoke_parses():
    assert subprocess.run(["bash", "-n", str(BENCHMARKS / "gpu_smoke.sh")], capture_output=True).returncode == 0


def test_gpu_smoke_refuses_an_unusable_out_dir(tmp_path):
    """A regular file as OUT_DIR: every step used to fail, and the script then reported 0 failures."""
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    result = smoke(str(afile), tmp_path, SMOKE_DEVICE="cpu")
    assert result.returncode == 2
    assert result.stdout.strip().count("\n") == 0 and "not a folder" in result.stdout


def test_gpu_smoke_rerun_starts_clean_in_a_relative_folder(tmp_path):
    """A rerun into an earlier smoke folder removes its results (bench JSON and smoke.json too), in the
    folder the relative OUT_DIR names from where the script was started; then stops here for want of CUDA."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would run for real")
    earlier = tmp_path / "smoke"
    (earlier / "logs").mkdir(parents=True)
    for name in (".cdft-gpu-smoke", "bench-train_step.json", "smoke.json", "logs/old.log"):
        (earlier / name).write_text("{}")
    result = smoke("smoke", tmp_path, SMOKE_DEVICE="cuda")
    assert result.returncode == 1 and "no CUDA device" in result.stdout
    assert sorted(p.name for p in earlier.iterdir()) == [".cdft-gpu-smoke", "logs", "status"]
    assert list((earlier / "logs").iterdir()) == []
