"""Each built-in strategy end to end from the CLI: a complete run directory, learning above
chance, frozen parts bit-identical to their starting weights, and staged's second stage
starting from the first stage's best weights at a tenth of the learning rate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_engine import LEARNED, engine_data, invoke, metric_lines, quick_args, read_json, stage_starts, staged_run
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.slow


def _weights_file(directory: Path, backbone: str) -> Path:
    """Starting weights for the backbone (seeded random values, the timm layout)."""
    import timm

    torch.manual_seed(123)
    model = timm.create_model(backbone, pretrained=False, num_classes=0, img_size=32) if "vit" in backbone else \
        timm.create_model(backbone, pretrained=False, num_classes=0)
    path = directory / f"{backbone}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _check_run_dir(run_dir: Path, stages: list[str]) -> dict:
    for name in ("config.yaml", "environment.json", "metrics.jsonl", "summary.json", "train.log", "confusion_matrix.csv"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    for i, stage in enumerate(stages, start=1):
        for name in ("best.safetensors", "best.json", "confusion_matrix.csv"):
            assert (run_dir / f"stage{i}-{stage}" / name).is_file()
    assert not (run_dir / "resume").exists()  # a complete run drops its resume state
    environment = read_json(run_dir / "environment.json")
    assert environment["packages"]["torch"] and environment["command"]
    summary = read_json(run_dir / "summary.json")
    plugins = environment["plugins"]  # which plugin and package provided each component
    assert plugins["dataset"]["plugin"] == "breakhis" and plugins["backbone"]["plugin"] == "timm"
    assert {row["distribution"] for row in plugins.values()} == {"cdft"} and plugins["strategy"]["name"] == summary["strategy"]
    from cdft_core.training.checkpoint import read_model

    assert read_model(str(run_dir / f"stage{len(stages)}-{stages[-1]}" / "best.safetensors"))[1]["cdft_plugins"] == plugins
    assert summary["status"] == "complete" and [s["name"] for s in summary["stages"]] == stages
    splits = {(line["stage"], line["epoch"], line["split"]) for line in metric_lines(run_dir)}
    assert {split for _, _, split in splits} == {"train", "val", "test"}
    return summary


@pytest.mark.parametrize(
    ("strategy", "backbone", "epochs", "lr"),
    [("linear", "test_vit", 6, 1e-2), ("frt", "test_convnext", 3, 3e-3), ("full", "test_convnext", 3, 3e-3)],
)
def test_strategy_end_to_end(tmp_path_factory, tmp_path, strategy, backbone, epochs, lr):
    root, split = engine_data(tmp_path_factory)
    weights = _weights_file(tmp_path, backbone)
    args = quick_args(root, split, strategy=strategy, backbone=backbone, epochs=epochs, lr=lr)
    args = [a for a in args if a != "--no-pretrained"] + ["--weights", str(weights), "--output", str(tmp_path / "run")]
    code, out, err = invoke(*args)
    assert code == 0, err
    summary = _check_run_dir(tmp_path / "run", [strategy])
    assert summary["test"]["accuracy"] >= LEARNED, summary["test"]
    assert "accuracy" in out and f"tensorboard --logdir {tmp_path / 'run'}/tensorboard" in out

    start = load_file(str(weights))
    best = load_file(str(tmp_path / "run" / f"stage1-{strategy}" / "best.safetensors"))
    backbone_keys = [k for k in best if k.startswith("backbone.")]
    assert len(backbone_keys) == len(start)
    same = [torch.equal(best[k], start[k.removeprefix("backbone.model.")]) for k in backbone_keys]
    if strategy == "full":
        assert not all(same)  # the comparison can tell trained from frozen
    else:
        assert all(same), "frozen backbone tensors changed"  # frozen means frozen, bit for bit


def test_staged_runs_both_stages_from_stage1_best(tmp_path_factory):
    """Stage 2 starts from stage 1's best-validation weights, lr x 0.1, warm-up restarted."""
    run_dir = staged_run(tmp_path_factory)
    seen = stage_starts(tmp_path_factory)
    summary = _check_run_dir(run_dir, ["frt", "full"])
    assert [name for name, _ in seen] == ["frt", "full"]

    best1 = load_file(str(run_dir / "stage1-frt" / "best.safetensors"))
    stage2_start = seen[1][1]
    assert set(best1) == set(stage2_start)
    assert all(torch.equal(best1[k], stage2_start[k]) for k in best1)  # stage 2 starts from stage 1's best
    best2 = load_file(str(run_dir / "stage2-full" / "best.safetensors"))
    assert not all(torch.equal(best1[k], best2[k]) for k in best1 if k.startswith("backbone."))  # stage 2 trains it

    lr = 3e-3
    assert [s["lr"] for s in summary["stages"]] == pytest.approx([lr, lr * 0.1])
    train = [line for line in metric_lines(run_dir) if line["split"] == "train"]
    assert [(line["stage"], line["epoch"]) for line in train] == [("frt", 1), ("frt", 2), ("full", 1), ("full", 2)]
    # warm-up restarts: the last lr of stage 2's first epoch is far below stage 1's at the same point
    assert train[2]["lr"] < lr * 0.1 and train[2]["lr"] == pytest.approx(train[0]["lr"] * 0.1)
    assert summary["test"] == summary["stages"][1]["test"] and summary["best_stage"] == "full"
    assert summary["test"]["accuracy"] >= LEARNED
