"""TensorBoard output of a staged run, read back with tensorboard's EventAccumulator: tags per
stage, values equal to metrics.jsonl, images, and the hparams summary in the run's own
event files (no sub-run)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_engine import metric_lines, read_json, staged_run

from cdft_core.training.tensorboard_log import flatten_hparams, render_confusion_matrix

pytestmark = pytest.mark.slow


def _accumulator(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_tags_and_values_read_back(tmp_path_factory):
    run_dir = staged_run(tmp_path_factory)
    assert [p.name for p in (run_dir / "tensorboard").iterdir() if p.is_dir()] == []  # hparams: no sub-run
    ea = _accumulator(run_dir)
    scalars = set(ea.Tags()["scalars"])
    for stage in ("stage1-frt", "stage2-full"):
        for tag in ("train/loss", "train/lr", "train/accuracy", "val/accuracy", "val/f1_macro", "val/f1_paper",
                    "test/accuracy", "test/precision_macro", "test/recall_macro"):
            assert f"{stage}/{tag}" in scalars
    images = set(ea.Tags()["images"])
    assert {"inputs/augmented", "stage1-frt/test/confusion_matrix", "stage2-full/test/confusion_matrix"} <= images

    lines = metric_lines(run_dir)
    val = [line["accuracy"] for line in lines if line["split"] == "val" and line["stage"] == "full"]
    assert [e.value for e in ea.Scalars("stage2-full/val/accuracy")] == pytest.approx(val)
    steps = [e.step for e in ea.Scalars("stage1-frt/train/loss")]
    assert steps == sorted(steps) and len(steps) == 6  # log_every 1: every step of 2 epochs x 3 steps

    lrs = [e.value for e in ea.Scalars("stage2-full/train/lr")]
    assert lrs[0] == pytest.approx(3e-3 * 0.1 * 0.01)  # stage 2 restarts the warm-up at 0.01 x its lr
    assert max(lrs) <= 3e-3 * 0.1 + 1e-12

    summary = read_json(run_dir / "summary.json")
    assert ea.Scalars("hparams/test_accuracy")[-1].value == pytest.approx(summary["test"]["accuracy"])


def test_hparams_summary_holds_the_config(tmp_path_factory):
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir = staged_run(tmp_path_factory)
    content = _accumulator(run_dir).PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(content)
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["strategy"].string_value == "staged"
    assert start.hparams["lr"].number_value == pytest.approx(3e-3)
    assert start.hparams["backbone"].string_value == "test_vit"


def test_confusion_matrix_image_and_csv(tmp_path_factory):
    run_dir = staged_run(tmp_path_factory)
    summary = read_json(run_dir / "summary.json")
    rows = (run_dir / "confusion_matrix.csv").read_text().splitlines()
    assert rows[0] == "true\\pred," + ",".join(summary["classes"])
    assert [[int(v) for v in row.split(",")[1:]] for row in rows[1:]] == summary["test"]["confusion_matrix"]
    image = render_confusion_matrix([[3, 1], [0, 5]], ["normal", "abnormal"])
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert (image < 250).any()  # something was drawn


def test_flatten_hparams():
    flat = flatten_hparams({"a": 1, "b": None, "c": {"d": "x", "e": [1, 2]}})
    assert flat == {"a": 1, "b": "none", "c.d": "x", "c.e": "[1, 2]"}
