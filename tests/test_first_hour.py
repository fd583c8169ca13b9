"""A new user's first hour: loader workers that fit the machine, a log that says where the
weights came from, a config.yaml that can be read back anywhere, progress and timestamps,
and a demo that writes outside the source tree and reports its measured time."""

from __future__ import annotations

import os
import re
import sys
import time

import pytest
import torch
import yaml
from helpers_engine import REPO, engine_data, invoke, quick_args
from safetensors.torch import save_file
from test_weights import build, fill_hub_cache, reference_state

from cdft_core.config import RunConfig, check_num_workers, dump_yaml, merge, resolve_config
from cdft_core.errors import UsageError
from cdft_core.training.loaders import describe_num_workers, make_loader, resolve_num_workers


def _cpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(count)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: count)


# -- --num-workers auto ---------------------------------------------------------------------
@pytest.mark.parametrize(("cpus", "processes", "expected"),
                         [(1, 1, 0), (2, 1, 2), (2, 2, 0), (4, 2, 2), (6, 4, 0), (16, 1, 8), (64, 4, 8)])
def test_auto_workers_fit_the_cpus_of_each_process(monkeypatch, cpus, processes, expected):
    _cpus(monkeypatch, cpus)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    workers = resolve_num_workers("auto")
    assert workers == expected
    assert workers * processes <= cpus  # never more workers than CPUs, over all the machine's processes
    assert resolve_num_workers("auto", cpus=cpus, processes=processes) == expected


def test_auto_workers_are_what_the_loader_uses(monkeypatch):
    _cpus(monkeypatch, 3)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    data = torch.utils.data.TensorDataset(torch.zeros(4, 1))
    assert make_loader(data, [0, 1, 2, 3], 2, "auto", 0).num_workers == 3
    assert describe_num_workers("auto") == "3 loader workers per process (auto: 3 CPUs, 1 process)"
    _cpus(monkeypatch, 1)
    assert make_loader(data, [0, 1], 2, "auto", 0).num_workers == 0
    assert describe_num_workers("auto") == "0 loader workers per process (auto: 1 CPU, 1 process)"


def test_explicit_worker_counts_pass_through(monkeypatch):
    _cpus(monkeypatch, 2)
    assert resolve_num_workers(0) == 0 and resolve_num_workers(5) == 5
    assert describe_num_workers(1) == "1 loader worker per process"
    assert RunConfig().num_workers == "auto"
    for given, expected in (("auto", "auto"), (" AUTO ", "auto"), ("3", 3), (3, 3), (0, 0), (2.0, 2)):
        assert check_num_workers(given) == expected
        assert merge(RunConfig(), {"num_workers": given}, source="test").num_workers == expected


@pytest.mark.parametrize("bad", ["-1", "many", "1.5", "", True])
def test_bad_worker_counts_are_usage_errors(bad):
    with pytest.raises(UsageError, match="num_workers must be auto or a number"):
        merge(RunConfig(), {"num_workers": bad}, source="test")


def test_bad_worker_count_on_the_command_line_is_exit_2(tmp_path_factory, tmp_path):
    root, split = engine_data(tmp_path_factory)
    args = quick_args(root, split, strategy="linear", epochs=1)
    args[args.index("--num-workers") + 1] = "lots"
    code, _, err = invoke(*args, "--output", str(tmp_path / "run"))
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cdft: error: ") and "'lots'" in lines[0], err
    assert not (tmp_path / "run").exists()
    code, _, err = invoke("demo", "--num-workers", "-2", "--output", str(tmp_path / "demo"))
    assert code == 2 and "--num-workers must be auto" in err, err


def test_resume_may_change_the_worker_count(tmp_path_factory, tmp_path):
    root, split = engine_data(tmp_path_factory)
    saved = RunConfig(dataset="breakhis", data_root=root, split_file=split, backbone="test_vit", num_workers=4)
    (tmp_path / "config.yaml").write_text(dump_yaml(saved))
    assert resolve_config({}, resume=str(tmp_path)).num_workers == 4
    assert resolve_config({"num_workers": "auto"}, resume=str(tmp_path)).num_workers == "auto"
    assert resolve_config({"num_workers": "0"}, resume=str(tmp_path)).num_workers == 0
    with pytest.raises(UsageError, match="num_workers must be auto"):
        resolve_config({"num_workers": "x"}, resume=str(tmp_path))


# -- one run: where the weights came from, the workers used, config.yaml ------------------
def test_run_logs_its_weights_and_workers_and_saves_a_portable_config(tmp_path_factory, tmp_path, monkeypatch):
    root, split = engine_data(tmp_path_factory)
    weights = tmp_path / "vit32.safetensors"
    save_file(reference_state(image_size=32), str(weights))
    args = quick_args(root, split, strategy="linear", epochs=1)
    args.remove("--no-pretrained")
    del args[args.index("--num-workers"):args.index("--num-workers") + 2]  # the default: auto
    _cpus(monkeypatch, 1)  # auto -> 0 workers: no worker processes in a test
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.chdir(tmp_path)
    code, _, err = invoke(*args, "--max-steps-per-epoch", "1", "--weights", "vit32.safetensors", "--output", "run")
    assert code == 0, err

    lines = [line for line in err.splitlines() if line.startswith("cdft: ")]
    assert all(re.match(r"cdft: \d\d:\d\d:\d\d ", line) for line in lines), lines  # stderr is no terminal here
    first = "\n".join(lines[:5])  # the run's first lines
    origin = f"backbone weights: loaded {len(reference_state(image_size=32))} tensors from file {weights}"
    assert origin in first, first
    assert "data loading: 0 loader workers per process (auto: 1 CPU, 1 process)" in first, first
    assert re.search(r"done in \d+ s: .*best checkpoint /", lines[-1]), lines[-1]
    assert origin in (tmp_path / "run" / "train.log").read_text()

    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["adapter"] == "none"  # the linear strategy's adapter, resolved (not null)
    assert saved["output"] == str(tmp_path / "run") and os.path.isabs(saved["runs_dir"])
    assert saved["data_root"] == root and os.path.isabs(saved["data_root"])
    assert saved["weights"] == str(weights)
    assert saved["num_workers"] == "auto"  # what was asked; the log says what it meant here


def test_weights_origin_names_random_init_the_file_and_the_hub_cache(tmp_path, monkeypatch):
    from cdft_core.models.weights import weights_origin

    assert weights_origin(build("test_vit")) == "random initialisation"
    path = tmp_path / "w.safetensors"
    save_file(reference_state(), str(path))
    assert weights_origin(build("test_vit", weights=str(path))).endswith(f"tensors from file {path}")

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fill_hub_cache(str(tmp_path / "hf" / "hub"), "timm/test_vit.r160_in1k", "model.safetensors", reference_state())
    origin = weights_origin(build("test_vit.r160_in1k", pretrained=True))
    assert "hub:timm/test_vit.r160_in1k" in origin and str(tmp_path / "hf" / "hub") in origin, origin

    class PluginBackbone:  # a third-party backbone that keeps no load report
        weights = "hub:org/model"

    assert weights_origin(PluginBackbone()) == "hub:org/model"


# -- progress and timestamps ---------------------------------------------------------------
def test_progress_bar_description_says_stage_and_epoch(monkeypatch):
    from cdft_core.training.log import progress_bar, stage_epoch

    assert stage_epoch(1, 2, 3, 5) == "stage 1/2 epoch 3/5"
    assert stage_epoch(1, 1, 1, 1) == "stage 1/1 epoch 1/1"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = progress_bar(True, 6, 0, stage_epoch(2, 2, 4, 5))
    assert bar.desc.startswith("stage 2/2 epoch 4/5")
    bar.close()


def test_log_lines_carry_the_time_off_a_terminal(capsys, monkeypatch):
    from cdft_core.training.log import RunLog

    log = RunLog(True)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    log("first")
    assert re.fullmatch(r"cdft: \d\d:\d\d:\d\d first\n", capsys.readouterr().err)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    log("second")
    assert capsys.readouterr().err == "cdft: second\n"  # a terminal shows it as it happens
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d (first|second)", line) for line in log.text().splitlines())
    RunLog(False)("other ranks say nothing")
    assert capsys.readouterr().err == ""


def test_evaluation_shows_a_bar_on_a_terminal_only(capsys, monkeypatch):
    from cdft_core.training.distributed import DistInfo
    from cdft_core.training.evaluation import evaluate

    data = [(torch.full((2,), float(i % 2)), i % 2) for i in range(6)]
    model = torch.nn.Linear(2, 2)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    result = evaluate(model, data, ["a", "b"], info, 2, 0, "fp32", description="evaluating test")
    assert result["n"] == 6 and capsys.readouterr().err == ""  # nothing noisy in a log file
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    evaluate(model, data, ["a", "b"], info, 2, 0, "fp32", description="evaluating test")
    err = capsys.readouterr().err
    assert "evaluating test" in err and "/3 " in err and "batch" in err


# -- cdft demo ------------------------------------------------------------------------------
def test_demo_default_location_is_the_user_cache(tmp_path, monkeypatch):
    from cdft_cli.demo import default_output

    monkeypatch.setenv("CDFT_CACHE_DIR", str(tmp_path / "cdft-cache"))
    assert default_output() == str(tmp_path / "cdft-cache" / "demo")
    monkeypatch.delenv("CDFT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_output() == str(tmp_path / "xdg" / "cdft" / "demo")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_output() == str(tmp_path / "home" / ".cache" / "cdft" / "demo")
    assert not default_output().startswith(str(REPO))


@pytest.mark.slow
def test_demo_writes_outside_the_source_tree_and_reports_its_measured_time(tmp_path, monkeypatch):
    monkeypatch.setenv("CDFT_CACHE_DIR", str(tmp_path / "cache" / "cdft"))
    monkeypatch.chdir(REPO)  # started from the source tree, it writes nothing there
    before = sorted(os.listdir(REPO))
    started = time.perf_counter()
    code, out, err = invoke("demo", "--epochs", "1", "--max-steps-per-epoch", "1", "--image-size", "32")
    measured = time.perf_counter() - started
    assert code == 0, err
    assert sorted(os.listdir(REPO)) == before
    workdir = tmp_path / "cache" / "cdft" / "demo"
    assert f"working directory: {workdir}" in out
    assert len(list((workdir / "runs").iterdir())) == 1 and (workdir / "breakhis-splits.csv").is_file()
    # the prepare warnings that explain the data (a patient in two classes, identical images)
    assert "cdft: warning: patient 13412 is filed under more than one class" in err, err
    assert "backbone weights: random initialisation" in err
    stated = re.search(r"cdft demo: done in (\d+) s", out)
    assert stated is not None, out
    assert abs(int(stated.group(1)) - measured) <= 2, (stated.group(0), measured)


def test_eval_takes_auto_workers_and_refuses_nonsense(tmp_path):
    code, _, err = invoke("eval", str(tmp_path / "no-run"), "--num-workers", "lots")
    assert code == 2 and "--num-workers must be auto or a number" in err, err
    code, _, err = invoke("eval", str(tmp_path / "no-run"), "--num-workers", "auto")
    assert code == 2 and "--num-workers" not in err, err  # accepted; the missing run is the error
