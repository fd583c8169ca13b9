"""Shared pieces of the engine tests: one small dataset per test process, quick run options,
CLI calls in-process and in subprocesses, and a completed staged run reused by several tests.

The data: the synthetic BreakHis tree with 3 images per patient and magnification, the
paper's task (4 malignant subtypes at 200X) and its patient-level split file. With
validation fold 1 and test fold 3 the three training folds hold every class equally
(fold 0 also holds the cross-class patient of the real data), and validation and test
have 9 images each — an odd number, so two processes see the sampler's padding.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
_CACHE: dict[str, Any] = {}

#: learning clearly above chance (the test fold has 3 classes: chance is 1/3 at best)
LEARNED = 0.6


def engine_data(factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(data root, split file) of the small synthetic BreakHis tree, built once per process."""
    if "data" not in _CACHE:
        from cdft_core.data.splits import prepare
        from cdft_core.data.synthetic import make_synthetic_breakhis
        from cdft_core.data.tables import write_split_file

        base = factory.mktemp("engine-data")
        root = make_synthetic_breakhis(str(base), seed=0, images_per_magnification=3)
        split = str(base / "splits.csv")
        write_split_file(prepare("breakhis", root, seed=1), split)
        _CACHE["data"] = (root, split)
    return _CACHE["data"]


def quick_args(root: str, split: str, *, strategy: str, backbone: str = "test_vit", epochs: int = 3,
               lr: float = 3e-3, extra: tuple[str, ...] = ()) -> list[str]:
    """``cdft run`` options for a run of a few seconds on CPU (32 px, 3 steps per epoch)."""
    return [
        "run", "--dataset", "breakhis", "--data-root", root, "--split-file", split, "--val-fold", "1",
        "--test-fold", "3", "--backbone", backbone, "--no-pretrained", "--image-size", "32", "--strategy", strategy,
        "--epochs", str(epochs), "--lr", str(lr), "--warmup-epochs", "0.5", "--batch-size", "8",
        "--num-workers", "0", "--log-every", "1", "--device", "cpu", *extra,
    ]


def staged_args(root: str, split: str) -> list[str]:
    """The staged run the resume, TensorBoard and distributed tests share (2 + 2 epochs)."""
    return quick_args(root, split, strategy="staged", epochs=2)


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``cdft ARGS`` in this process; return (exit code, stdout, stderr)."""
    from cdft_cli.main import main
    from cdft_core.registry import reset_registry

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    reset_registry()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exited:
            main(list(args))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return int(exited.value.code or 0), out.getvalue(), err.getvalue()


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env.pop("CDFT_TEST_FAULT", None)
    env.update(extra)
    return env


def cdft_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cdft_cli", *args]


def run_subprocess(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cdft_command(*args), env=env or subprocess_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def staged_run(factory: pytest.TempPathFactory) -> Path:
    """A completed in-process staged run (the uninterrupted reference), built once per process.

    While it runs, the weights each stage starts from are recorded (see :func:`stage_starts`).
    """
    if "staged" not in _CACHE:
        import cdft_core.strategy as strategy_module

        root, split = engine_data(factory)
        run_dir = factory.mktemp("staged") / "run"
        starts: list[tuple[str, dict]] = []
        apply_stage = strategy_module.apply_stage

        def recording_apply_stage(model, stage):
            starts.append((stage.name, {k: v.detach().clone() for k, v in model.state_dict().items()}))
            return apply_stage(model, stage)

        strategy_module.apply_stage = recording_apply_stage
        try:
            code, out, err = invoke(*staged_args(root, split), "--output", str(run_dir))
        finally:
            strategy_module.apply_stage = apply_stage
        assert code == 0, err
        _CACHE["staged"] = (run_dir, out, err, starts)
    return _CACHE["staged"][0]


def stage_starts(factory: pytest.TempPathFactory) -> list[tuple[str, dict]]:
    """(stage name, state dict) as each stage of :func:`staged_run` began."""
    staged_run(factory)
    return _CACHE["staged"][3]


def staged_output(factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(stdout, stderr) of :func:`staged_run`."""
    staged_run(factory)
    return _CACHE["staged"][1], _CACHE["staged"][2]


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def metric_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def comparable(metrics: dict) -> dict:
    """The metrics that must match exactly between runs (all but the float loss)."""
    return {k: v for k, v in metrics.items() if k != "loss"}
