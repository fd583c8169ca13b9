"""Numbers you can trust: frozen parts stay frozen (buffers too), every rank evaluates the
model rank 0 saves (BatchNorm under DDP), the test split is evaluated once per stage from
the best-validation weights, and non-finite numbers are refused."""

from __future__ import annotations

import json
import types

import pytest
import torch
from helpers_engine import comparable, engine_data, invoke, quick_args, read_json, run_subprocess

from cdft_core import FROZEN, Stage, Strategy, hookimpl, strategy_metadata, train_only


def _last_stage_only() -> Strategy:
    """Train layer4 and the head of a ResNet; everything else (BatchNorm included) frozen."""
    return Strategy("last-stage", (Stage("last", train_only("backbone.model.layer4", "head"), {"trainable": {}}),),
                    default_adapter="none")


def _plugin() -> types.ModuleType:
    module = types.ModuleType("trust_strategies")

    @hookimpl
    def register_strategies(register):
        register("last-stage", _last_stage_only, metadata=strategy_metadata(_last_stage_only(), trains="layer4, head"))

    module.register_strategies = register_strategies
    return module


def test_frozen_parts_keep_their_parameters_and_buffers(tmp_path_factory, monkeypatch):
    import cdft_core.registry as registry_module
    import cdft_core.strategy as strategy_module
    from cdft_core.config import RunConfig
    from cdft_core.training import engine
    from cdft_core.training.checkpoint import read_model

    registry = registry_module.load_registry(entry_points=False, extra_plugins=[("trust", _plugin())])
    monkeypatch.setattr(registry_module, "_REGISTRY", registry)
    starts: list[dict] = []
    apply_stage = strategy_module.apply_stage

    def recording(model, stage):
        labels = apply_stage(model, stage)
        starts.append({"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "labels": labels,
                       "frozen_modules": model.frozen_modules})
        return labels

    monkeypatch.setattr(strategy_module, "apply_stage", recording)
    root, split = engine_data(tmp_path_factory)
    out = tmp_path_factory.mktemp("frozen") / "run"
    config = RunConfig(dataset="breakhis", data_root=root, split_file=split, val_fold=1, test_fold=3,
                       backbone="test_resnet", pretrained=False, image_size=32, strategy="last-stage", epochs=2,
                       lr=1e-2, warmup_epochs=0.5, batch_size=8, num_workers=0, device="cpu", output=str(out))
    engine.main(config)
    assert "backbone.model.bn1" in starts[0]["frozen_modules"] and "backbone.model.layer1" in starts[0]["frozen_modules"]
    assert not any(name.startswith(("backbone.model.layer4", "head")) for name in starts[0]["frozen_modules"])

    before, labels = starts[0]["state"], starts[0]["labels"]
    after, _ = read_model(str(out / "stage1-last" / "best.safetensors"))
    frozen_prefixes = [n.rsplit(".", 1)[0] for n, label in labels.items() if label == FROZEN]
    checked = moved = 0
    for name, value in before.items():
        if name.rsplit(".", 1)[0] in frozen_prefixes:  # parameters *and* buffers (running stats) of frozen modules
            assert torch.equal(after[name], value), name
            checked += 1
        elif name.startswith("backbone.model.layer4") and "running_mean" in name:
            moved += not torch.equal(after[name], value)
    assert checked > 20 and any("running_mean" in n for n in before if n.rsplit(".", 1)[0] in frozen_prefixes)
    assert moved > 0  # the trained part's BatchNorm statistics do move


def test_two_process_batchnorm_run_matches_eval_of_its_checkpoint(tmp_path_factory):
    root, split = engine_data(tmp_path_factory)
    run_dir = tmp_path_factory.mktemp("ddp-bn") / "run"
    args = quick_args(root, split, strategy="full", backbone="test_resnet", epochs=2, lr=1e-2)
    done = run_subprocess(*args, "--output", str(run_dir), "--nproc-per-node", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = read_json(run_dir / "summary.json")
    assert summary["world_size"] == 2
    for split_name in ("val", "test"):
        code, out, err = invoke("eval", str(run_dir), "--split", split_name, "--json")
        assert code == 0, err
        single = json.loads(out)["metrics"]
        assert comparable(single) == comparable(summary[split_name])
        # cdft eval lays its batches out as the run's 2 processes did: the same logits, bit for bit
        assert single["loss"] == summary[split_name]["loss"]


def test_sync_batchnorm_needs_cuda(tmp_path_factory):
    root, split = engine_data(tmp_path_factory)
    args = quick_args(root, split, strategy="full", backbone="test_resnet", epochs=1)
    code, _, err = invoke(*args, "--sync-batchnorm", "--output", str(tmp_path_factory.mktemp("sbn") / "run"))
    assert code == 2 and "--sync-batchnorm needs CUDA" in err and "Traceback" not in err


def test_test_split_is_evaluated_once_per_stage_from_the_best_weights(tmp_path_factory):
    from helpers_engine import staged_output, staged_run

    run_dir = staged_run(tmp_path_factory)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tests = [line for line in lines if line["split"] == "test"]
    summary = read_json(run_dir / "summary.json")
    assert [(t["stage_index"], t["epoch"]) for t in tests] == [(s["index"], s["best_epoch"]) for s in summary["stages"]]
    _, err = staged_output(tmp_path_factory)
    epoch_lines = [line for line in err.splitlines() if " epoch " in line and "val acc" in line]
    assert epoch_lines and not any("test" in line for line in epoch_lines)
    for stage in summary["stages"]:
        best = read_json(run_dir / stage["checkpoint"].replace("best.safetensors", "best.json"))
        assert best["test"] == stage["test"] and best["epoch"] == stage["best_epoch"]


@pytest.mark.parametrize("option", [("--lr", "inf"), ("--weight-decay", "nan"), ("--warmup-epochs", "-inf"),
                                    ("--strategy-option", "lr_factor=inf"), ("--adapter-option", "dropout=nan")])
def test_non_finite_options_are_usage_errors(tmp_path_factory, option):
    root, split = engine_data(tmp_path_factory)
    args = quick_args(root, split, strategy="staged", epochs=1)
    out = tmp_path_factory.mktemp("nonfinite") / "run"
    code, _, err = invoke(*args, *option, "--output", str(out))
    assert code == 2, err
    assert "finite" in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_non_finite_loss_stops_the_run_with_one_line(tmp_path_factory):
    root, split = engine_data(tmp_path_factory)
    out = tmp_path_factory.mktemp("diverge") / "run"
    args = quick_args(root, split, strategy="full", epochs=3, lr=1e30)
    code, _, err = invoke(*args, "--output", str(out))
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert "training loss is not finite" in last and "stage 1, epoch" in last and "--lr" in last
    assert not (out / "summary.json").exists()


def test_a_split_file_that_lists_an_image_twice_is_refused(tmp_path_factory, tmp_path):
    import pandas as pd

    root, split = engine_data(tmp_path_factory)
    table = pd.read_csv(split)
    repeated = pd.concat([table, table.iloc[[3]].assign(fold=(table.iloc[3]["fold"] + 1) % 5)], ignore_index=True)
    bad = tmp_path / "repeated.csv"
    repeated.to_csv(bad, index=False)
    args = quick_args(root, str(bad), strategy="linear", epochs=1)
    code, _, err = invoke(*args, "--output", str(tmp_path / "run"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"lines 5 and {len(table) + 2} list image {table.iloc[3]['image_path']!r} twice" in err
    assert not (tmp_path / "run").exists()


def test_resume_of_a_complete_run_is_refused_before_any_work(tmp_path_factory):
    import time

    from helpers_engine import staged_run

    run_dir = staged_run(tmp_path_factory)
    started = time.time()
    code, _, err = invoke("run", "--resume", str(run_dir))
    assert code == 2 and "is complete" in err
    assert time.time() - started < 2
