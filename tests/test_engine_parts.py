"""The engine's parts on their own: schedule, seeds, checkpoints without pickle, run
directories (local and fsspec URL), and the torchrun command line."""

from __future__ import annotations

import json
import math
import random
import re
import types

import numpy as np
import pytest
import torch
from helpers_engine import engine_data, invoke, quick_args

from cdft_core.errors import UsageError
from cdft_core.training.checkpoint import (
    capture_rng,
    flatten_optimizer,
    latest_resume,
    load_model_file,
    restore_rng,
    resume_tag,
    save_model,
    save_resume,
    unflatten_optimizer,
)
from cdft_core.training.launch import LaunchOptions, WorkerCommand, describe_failures, torchrun_argv
from cdft_core.training.rundir import RunDir, auto_name, check_output, create_run_dir
from cdft_core.training.schedule import derive_seed, lr_factor


def test_schedule_warmup_then_cosine():
    warmup, total = 20, 100
    assert lr_factor(0, warmup, total, 0.01) == pytest.approx(0.01)
    assert lr_factor(10, warmup, total, 0.01) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(20, warmup, total, 0.01) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))  # cosine from step 0
    assert lr_factor(99, warmup, total, 0.01) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.99)))
    assert lr_factor(5, 0, total, 0.01) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.05)))  # no warm-up


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(1, "augment", 0, 5) == derive_seed(1, "augment", 0, 5)
    assert len({derive_seed(1, "augment", e, i) for e in range(3) for i in range(50)}) == 150
    assert 0 <= derive_seed(1) < 2**63


def test_optimizer_state_round_trip_without_pickle():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam([{"params": [model.weight], "lr": 0.1, "label": "a"}, {"params": [model.bias], "lr": 0.2}])
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    tensors, rest = flatten_optimizer(opt.state_dict())
    json.dumps(rest)  # everything that is not a tensor is plain JSON
    restored = unflatten_optimizer(tensors, json.loads(json.dumps(rest)))
    original = opt.state_dict()
    assert restored["param_groups"] == original["param_groups"]
    for pid, entry in original["state"].items():
        for key, value in entry.items():
            assert torch.equal(restored["state"][pid][key], value)
    fresh = torch.optim.Adam([{"params": [model.weight], "lr": 0.1, "label": "a"}, {"params": [model.bias], "lr": 0.2}])
    fresh.load_state_dict(restored)


def test_rng_capture_and_restore():
    tensors, rest = capture_rng()
    json.dumps(rest)
    a = (torch.rand(3), random.random(), np.random.rand())
    restore_rng(tensors, rest)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_model_file_and_resume_state(tmp_path):
    rundir = RunDir(str(tmp_path))
    state = {"w": torch.arange(6.0).view(2, 3), "b": torch.zeros(2)}
    save_model(rundir, "m.safetensors", state, {"cdft_spec": {"backbone": "x"}, "cdft_epoch": 3})
    tensors, meta = load_model_file((tmp_path / "m.safetensors").read_bytes(), "m")
    assert torch.equal(tensors["w"], state["w"]) and meta == {"cdft_spec": {"backbone": "x"}, "cdft_epoch": 3}

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    for step in (1, 2):
        save_resume(rundir, tag=resume_tag(0, step, 0), model_state=model.state_dict(),
                    optimizer_state=opt.state_dict(), rng_states=[capture_rng()], progress={"epoch": step})
    assert sorted(p.name for p in (tmp_path / "resume").iterdir()) == [
        "s00-e00002-b0000000.json", "s00-e00002-b0000000.model.safetensors", "s00-e00002-b0000000.state.safetensors"]
    loaded = latest_resume(rundir)
    assert loaded["progress"] == {"epoch": 2} and torch.equal(loaded["model"]["weight"], model.weight.detach())
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl"))


def test_run_directories(tmp_path):
    name = auto_name("breakhis", "vit_base_patch16_clip_224.laion2b", "staged", 0, 1, 1, when=0)
    assert name.startswith("breakhis-vit_base_patch16_clip_224.laion2b-staged-v0t1-s1-19")
    assert re.fullmatch(r".*-s1-\d{8}-\d{6}", name)  # the documented YYYYmmdd-HHMMSS, not YYYYmmdd_HHMMSS
    assert auto_name("a-b", "x/y", "s", 0, 1, 1, when=0).startswith("a_b-x_y-s-v0t1-s1-")
    first = create_run_dir(None, str(tmp_path), "same")
    (tmp_path / "same" / "config.yaml").write_text("x")
    second = create_run_dir(None, str(tmp_path), "same")
    assert (first.url, second.url) == (str(tmp_path / "same"), str(tmp_path / "same-2"))
    with pytest.raises(UsageError, match="already holds a run; .* continue that run with `cdft run --resume"):
        check_output(str(tmp_path / "same"), "runs")
    (tmp_path / "same" / "summary.json").write_text("{}")
    with pytest.raises(UsageError, match=r"already holds a complete run; choose a new directory$"):
        check_output(str(tmp_path / "same"), "runs")
    check_output(str(tmp_path / "empty-ok"), "runs")  # a new directory is fine


def test_an_output_folder_that_takes_no_file_is_refused_whatever_its_permission_bits(tmp_path, monkeypatch):
    """Root passes permission checks on a read-only mount or an immutable folder: the run's
    output is checked by creating a file there, as every other command's is."""
    import tempfile

    locked = tmp_path / "locked"
    locked.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir == str(locked):
            raise OSError(30, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    with pytest.raises(UsageError, match=rf"--output '{locked}/run' is not writable \({locked} does not allow writing\)"):
        check_output(str(locked / "run"), "runs")
    assert list(locked.iterdir()) == []


def test_run_and_eval_on_an_fsspec_url(tmp_path_factory):
    import fsspec

    root, split = engine_data(tmp_path_factory)
    url = f"memory://cdft-test-{random.randrange(10**9)}/run"
    code, out, err = invoke(*quick_args(root, split, strategy="linear", epochs=1), "--output", url)
    assert code == 0, err
    fs = fsspec.filesystem("memory")
    files = {p.rsplit("/", 1)[-1] for p in fs.find(url.removeprefix("memory://"))}
    assert {"config.yaml", "summary.json", "metrics.jsonl", "best.safetensors"} <= files
    assert any(f.startswith("events.out.tfevents") for f in files)
    code, out, err = invoke("eval", url, "--json")
    assert code == 0, err
    assert json.loads(out)["metrics"]["n"] == 9


def test_torchrun_command_lines():
    standalone = torchrun_argv(LaunchOptions(nproc_per_node="2"), WorkerCommand("cdft_cli", ("run", "--x")))
    assert "--standalone" in standalone and standalone[-4:] == ["--module", "cdft_cli", "run", "--x"]
    multi = torchrun_argv(LaunchOptions(nproc_per_node="1", nnodes="2", rdzv_endpoint="127.0.0.1:29400"), WorkerCommand("cdft_cli", ("run",)))
    assert multi[multi.index("--rdzv-backend") + 1] == "c10d" and "--standalone" not in multi
    static = torchrun_argv(LaunchOptions(nnodes="2", node_rank=1, rdzv_endpoint="h:1", rdzv_backend="static"), WorkerCommand("cdft_cli", ("run",)))
    assert static[static.index("--node-rank") + 1] == "1" and static[static.index("--master-port") + 1] == "1"
    from torch.distributed.run import get_args_parser

    parsed = get_args_parser().parse_args(multi)  # torchrun's own parser accepts what we build
    assert parsed.nnodes == "2" and parsed.module and parsed.training_script == "cdft_cli"
    with pytest.raises(UsageError, match="--node-rank 2 must be below"):
        torchrun_argv(LaunchOptions(nnodes="2", node_rank=2, rdzv_endpoint="h:1"), WorkerCommand("cdft_cli", ("run",)))
    assert not LaunchOptions().requested and LaunchOptions(nnodes="1").requested


def test_failure_report_names_the_cause_first():
    def failure(code, message, timestamp):
        return types.SimpleNamespace(exitcode=code, message={"message": message}, timestamp=timestamp)

    text = describe_failures({
        0: failure(1, "RuntimeError: Connection closed by peer", 10),
        1: failure(1, "CdftError: out of memory on the data", 10),
        2: failure(-9, "", 11),
    })
    assert text.startswith("distributed run failed: rank 1 exited with code 1: out of memory on the data; ")
    assert "rank 2 was killed by SIGKILL" in text and text.index("rank 2") < text.index("rank 0")
    assert text.endswith("rank 0 exited with code 1: lost its connection to the failed rank")  # not gloo's text
    alone = describe_failures({0: failure(1, "RuntimeError: Connection closed by peer", 10)})
    assert alone.endswith("Connection closed by peer")  # the only failure keeps its own words
