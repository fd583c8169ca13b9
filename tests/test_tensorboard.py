"""TensorBoard output, read back from real event files with tensorboard's EventAccumulator:
the same tags for a one-stage and a staged run (on the global step, ``train/stage`` to tell
stages apart), values equal to metrics.jsonl, test points once per stage, the hparams
summary with resolved values and one type per key in the run's own event files, a labelled
confusion-matrix figure and a class-labelled input grid that leaves training unchanged."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers_engine import engine_data, invoke, metric_lines, quick_args, read_json, staged_run

from cdft_core.training.tensorboard_log import (
    FIGURE_DPI,
    TensorBoardLog,
    confusion_cell_text,
    confusion_figure_size,
    flatten_hparams,
    grid_per_class,
    pick_grid,
    render_confusion_matrix,
    render_input_grid,
    tags_at,
    text_colour,
    wrap_label,
)

pytestmark = pytest.mark.slow

_RUNS: dict[str, object] = {}
#: tags that would say a run's configuration rather than a measurement
NOISE_KEYS = {"data_root", "split_file", "weights", "output", "runs_dir", "num_workers", "log_every", "dist_timeout",
              "tensorboard", "eval_batch_size", "grad_checkpointing"}


def _linear_run(factory, *, tensorboard: bool = True):
    """A completed one-stage (linear) run of 2 epochs x 3 steps, with or without TensorBoard."""
    key = f"linear-{tensorboard}"
    if key not in _RUNS:
        root, split = engine_data(factory)
        run_dir = factory.mktemp(key) / "run"
        extra = () if tensorboard else ("--no-tensorboard",)
        code, _, err = invoke(*quick_args(root, split, strategy="linear", epochs=2, extra=extra), "--output", str(run_dir))
        assert code == 0, err
        _RUNS[key] = run_dir
    return _RUNS[key]


def _accumulator(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def _points(ea, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def _hparams(run_dir):
    """(experiment, session start info) of the run's hparams summary."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = _accumulator(run_dir).PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(content)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    return experiment, start


# -- tags and values ----------------------------------------------------------------------
def test_one_stage_and_staged_runs_have_the_same_tags(tmp_path_factory):
    staged, linear = _accumulator(staged_run(tmp_path_factory)), _accumulator(_linear_run(tmp_path_factory))
    assert set(staged.Tags()["scalars"]) == set(linear.Tags()["scalars"])  # both have one label group: train/lr
    expected = {"train/loss", "train/lr", "train/stage", "train/accuracy", "train/epoch_loss", "val/loss",
                "test/loss", "test/stage", "test/epoch", "hparams/val_accuracy", "hparams/test_accuracy"}
    for split in ("val", "test"):
        expected |= {f"{split}/{m}" for m in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_paper")}
    assert expected <= set(staged.Tags()["scalars"])
    assert not [t for t in staged.Tags()["scalars"] if t.startswith("stage")]
    assert set(staged.Tags()["images"]) == set(linear.Tags()["images"]) == {"inputs/augmented", "test/confusion_matrix"}


def test_staged_values_on_the_global_step(tmp_path_factory):
    run_dir = staged_run(tmp_path_factory)
    ea = _accumulator(run_dir)
    assert [p.name for p in (run_dir / "tensorboard").iterdir() if p.is_dir()] == []  # hparams: no sub-run
    lines = metric_lines(run_dir)
    val = [(line["global_step"], line["accuracy"]) for line in lines if line["split"] == "val"]
    assert [s for s, _ in val] == [3, 6, 9, 12]  # both stages on one x axis
    assert _points(ea, "val/accuracy") == [(s, pytest.approx(v)) for s, v in val]
    # log_every 1: every step of 2 stages x 2 epochs x 3 steps, each with its stage
    assert _points(ea, "train/stage") == [(s, 1.0 if s <= 6 else 2.0) for s in range(1, 13)]
    assert [s for s, _ in _points(ea, "train/loss")] == list(range(1, 13))
    lrs = dict(_points(ea, "train/lr"))
    assert lrs[7] == pytest.approx(3e-3 * 0.1 * 0.01)  # stage 2 restarts the warm-up at 0.01 x its lr
    assert max(v for s, v in lrs.items() if s > 6) <= 3e-3 * 0.1 + 1e-12

    # the test metrics: once per stage, at the step where the stage ends, with its number and best epoch
    summary = read_json(run_dir / "summary.json")
    ends = [6, 12]
    assert _points(ea, "test/accuracy") == [(step, pytest.approx(stage["test"]["accuracy"]))
                                            for step, stage in zip(ends, summary["stages"], strict=True)]
    assert _points(ea, "test/stage") == [(6, 1.0), (12, 2.0)]
    assert _points(ea, "test/epoch") == [(6, summary["stages"][0]["best_epoch"]), (12, summary["stages"][1]["best_epoch"])]
    assert [e.step for e in ea.Images("test/confusion_matrix")] == [6, 12]
    assert ea.Scalars("hparams/test_accuracy")[-1].value == pytest.approx(summary["test"]["accuracy"])
    assert ea.Scalars("hparams/val_accuracy")[-1].value == pytest.approx(summary["val"]["accuracy"])


def test_one_stage_run_values(tmp_path_factory):
    ea = _accumulator(_linear_run(tmp_path_factory))
    assert _points(ea, "train/stage") == [(s, 1.0) for s in range(1, 7)]
    assert [s for s, _ in _points(ea, "test/accuracy")] == [6]
    assert _points(ea, "test/stage") == [(6, 1.0)]


def test_a_resumed_log_writes_no_point_twice(tmp_path):
    """Events at the saved step stay after a resume; what the resumed run logs there again is skipped."""
    import struct

    first = TensorBoardLog(str(tmp_path), enabled=True)
    first.scalar("val/accuracy", 0.4, 6)
    first.scalar("test/accuracy", 0.5, 6)  # a stage completion, then the kill
    first.scalar("train/loss", 1.0, 7)
    first.close()
    (tmp_path / "events.out.tfevents.0.cut").write_bytes(struct.pack("<Q", 1000) + b"\0" * 14)  # cut short by a kill
    (tmp_path / "events.out.tfevents.0.huge").write_bytes(struct.pack("<Q", 1 << 40) + b"\0" * 8)  # a damaged header
    (tmp_path / "events.out.tfevents.0.junk").write_bytes(bytes(range(256)) * 4)  # not TFRecord at all
    assert tags_at(str(tmp_path), 6) == {"val/accuracy", "test/accuracy"}
    # event files sort by their name's whole-second time, then a per-process counter that does
    # not sort numerically: a resumed run starts later, so its file must get a later second
    time.sleep(1.05 - time.time() % 1)
    resumed = TensorBoardLog(str(tmp_path), enabled=True, purge_step=7)
    resumed.scalar("test/accuracy", 0.5, 6)  # the completion, redone
    resumed.scalar("test/stage", 1, 6)
    resumed.scalar("train/loss", 2.0, 7)
    resumed.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    ea.Reload()
    assert _points(ea, "test/accuracy") == [(6, 0.5)] and _points(ea, "test/stage") == [(6, 1.0)]
    assert _points(ea, "val/accuracy") == [(6, pytest.approx(0.4))] and _points(ea, "train/loss") == [(7, 2.0)]


# -- hparams ------------------------------------------------------------------------------
def test_hparams_hold_resolved_values_without_noise(tmp_path_factory):
    from tensorboard.plugins.hparams import api_pb2

    types = {}
    for run_dir, adapter, strategy in ((staged_run(tmp_path_factory), "cdtm", "staged"),
                                       (_linear_run(tmp_path_factory), "none", "linear")):
        experiment, start = _hparams(run_dir)
        values = start.hparams
        assert values["adapter"].string_value == adapter  # the strategy's default, as built (config: unset)
        assert values["strategy"].string_value == strategy
        assert values["backbone"].string_value == "test_vit.r160_in1k"  # the registry's full name of test_vit
        assert values["image_size"].number_value == 32
        assert values["lr"].number_value == pytest.approx(3e-3)
        assert values["protocol"].string_value and values["precision"].string_value == "fp32"
        assert values["backbone_init"].string_value == "random" and values["seed"].number_value == 1
        assert not set(values) & NOISE_KEYS
        assert "folds" not in values and "max_steps_per_epoch" not in values  # unset: left out, never "none"
        assert all(v.string_value != "none" or k == "adapter" for k, v in values.items())
        if adapter == "cdtm":
            assert any(k.startswith("adapter_options.") for k in values)  # the adapter's resolved options
        # one type per key: what the experiment declares is what the session holds
        for info in experiment.hparam_infos:
            kind = values[info.name].WhichOneof("kind")
            expected = {api_pb2.DATA_TYPE_FLOAT64: "number_value", api_pb2.DATA_TYPE_STRING: "string_value"}
            assert expected[info.type] == kind, info.name
            assert types.setdefault(info.name, info.type) == info.type, info.name  # the same in both runs
        metrics = {m.name.tag for m in experiment.metric_infos}
        assert {"hparams/val_accuracy", "hparams/test_accuracy", "hparams/test_f1_macro", "hparams/test_f1_paper",
                "hparams/test_precision_macro", "hparams/test_recall_macro"} <= metrics
    assert {"stages", "total_epochs", "world_size", "num_classes"} <= set(types)


def test_run_hparams_resolve_what_the_config_leaves_unset():
    from cdft_core.config import RunConfig
    from cdft_core.strategy import Stage, Strategy
    from cdft_core.training.records import run_hparams

    def label(_):
        return {}

    config = RunConfig(dataset="breakhis", data_root="/data/x", split_file="/data/s.csv", backbone="test_vit",
                       adapter=None, image_size=None, weights="/w.safetensors", output="/out")
    strategy = Strategy("staged", (Stage("frt", label, {}), Stage("full", label, {}, epochs=3, init="best")),
                        default_adapter="cdtm")
    run = SimpleNamespace(
        config=config, strategy=strategy, precision="bf16",
        model=SimpleNamespace(spec={"backbone": "test_vit", "adapter": "cdtm", "image_size": 160,
                                    "adapter_options": {"depth": 2, "gate": None, "shared": True}}),
        splits=SimpleNamespace(protocol="patient", classes=["a", "b", "c"]),
        dist=SimpleNamespace(world_size=2, device=torch.device("cpu")),
    )
    flat = flatten_hparams(run_hparams(run))
    assert flat["adapter"] == "cdtm" and flat["image_size"] == 160.0 and flat["backbone_init"] == "file"
    assert flat["adapter_options.depth"] == 2.0 and flat["adapter_options.shared"] == "true"
    assert "adapter_options.gate" not in flat and "eval_batch_size" not in flat
    assert flat["total_epochs"] == config.epochs + 3 and flat["stages"] == 2.0 and flat["world_size"] == 2.0
    assert not set(flat) & NOISE_KEYS
    assert not [v for v in flat.values() if isinstance(v, str) and v.startswith("/")]  # no path anywhere


def test_flatten_hparams_gives_one_type_per_kind():
    flat = flatten_hparams({"a": 1, "b": None, "c": {"d": "x", "e": [1, 2], "f": True}, "g": 0.5})
    assert flat == {"a": 1.0, "c.d": "x", "c.e": "1,2", "c.f": "true", "g": 0.5}
    assert type(flat["a"]) is float


# -- the confusion matrix -----------------------------------------------------------------
def test_confusion_cell_text_shows_counts_and_row_percentages():
    assert confusion_cell_text([[3, 1], [0, 5]]) == [["3\n75%", "1\n25%"], ["0\n0%", "5\n100%"]]
    assert confusion_cell_text([[0, 0], [2, 0]]) == [["", ""], ["2\n100%", "0\n0%"]]  # absent class: no rates
    assert confusion_cell_text([[1, 199]]) == [["1\n<1%", "199\n>99%"]]  # rounding hides neither


def test_confusion_matrix_figure(tmp_path_factory):
    classes = ["adenosis", "ductal_carcinoma_in_situ_of_a_very_long_name", "absent class", "phyllodes_tumor", "x"]
    matrix = [[5, 1, 0, 0, 0], [2, 9, 0, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0, 4, 0], [1, 0, 0, 0, 3]]
    image = render_confusion_matrix(matrix, classes, title="test confusion matrix — stage 2/2 (full), epoch 7")
    width, height = confusion_figure_size(len(classes))
    assert image.shape == (round(height * FIGURE_DPI), round(width * FIGURE_DPI), 3) and image.dtype == np.uint8
    assert (np.abs(image.astype(int) - 230) <= 1).all(axis=2).any()  # the grey row of the absent class
    assert image.min() < 50  # dark ink and a dark diagonal cell
    small = render_confusion_matrix([[3, 1], [0, 5]], ["normal", "abnormal"])
    assert small.shape[:2] == (round(confusion_figure_size(2)[1] * FIGURE_DPI), round(confusion_figure_size(2)[0] * FIGURE_DPI))

    assert wrap_label("ductal_carcinoma_in_situ_of_a_very_long_name").replace("\n", "") == \
        "ductal_carcinoma_in_situ_of_a_very_long_name"  # wrapped, not cut
    assert max(len(line) for line in wrap_label("ductal_carcinoma_in_situ_of_a_very_long_name").split("\n")) <= 15
    assert text_colour((0.03, 0.19, 0.42)) == "white" and text_colour((0.97, 0.98, 1.0)) == "black"

    run_dir = staged_run(tmp_path_factory)
    summary = read_json(run_dir / "summary.json")
    rows = (run_dir / "confusion_matrix.csv").read_text().splitlines()
    assert rows[0] == "true\\pred," + ",".join(summary["classes"])
    assert [[int(v) for v in row.split(",")[1:]] for row in rows[1:]] == summary["test"]["confusion_matrix"]
    logged = _accumulator(run_dir).Images("test/confusion_matrix")[-1]
    width, height = confusion_figure_size(len(summary["classes"]))
    assert (logged.width, logged.height) == (round(width * FIGURE_DPI), round(height * FIGURE_DPI))


# -- the input grid -----------------------------------------------------------------------
def test_pick_grid_takes_the_first_images_of_each_class():
    labels = [0, 1, 0, 2, 1, 0, 0]
    order = [6, 5, 4, 3, 2, 1, 0]
    assert pick_grid(labels, order, ["a", "b", "c", "d"], 2) == [(6, "a"), (5, "a"), (4, "b"), (1, "b"), (3, "c")]
    assert grid_per_class(4) == 4 and grid_per_class(32) == 2 and grid_per_class(200) == 1
    image = render_input_grid(torch.zeros(5, 3, 8, 8), ["a", "a", "b", "b", "a very long class name"], (0.5,) * 3, (0.2,) * 3)
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8


def test_input_grid_is_logged_by_class_and_leaves_training_unchanged(tmp_path_factory):
    run_dir = staged_run(tmp_path_factory)
    summary = read_json(run_dir / "summary.json")
    grid = _accumulator(run_dir).Images("inputs/augmented")
    assert [e.step for e in grid] == [0]
    assert grid[0].height == round((0.6 + 1.2 * len(summary["classes"])) * FIGURE_DPI)  # one row per class

    with_tb, without_tb = _linear_run(tmp_path_factory), _linear_run(tmp_path_factory, tensorboard=False)
    assert not (without_tb / "tensorboard").exists()
    assert metric_lines(with_tb) == metric_lines(without_tb)  # same data order, augmentation and RNG stream
