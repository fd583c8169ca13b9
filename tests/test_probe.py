"""`cdft probe`: the vmapped sweep's chosen head is the head trained alone, the run directory
is one `cdft eval` reads (and reproduces), and the features come from the cache."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers_engine import engine_data, invoke, metric_lines, read_json
from safetensors.torch import load_file

from cdft_core.training.loaders import steps_per_epoch, train_order
from cdft_core.training.probe import chosen_head, grid, sweep
from cdft_core.training.schedule import lr_factor

DIM, CLASSES, COUNT, VIEWS, EPOCHS, BATCH = 12, 3, 20, 2, 4, 6


def _train_alone(head: torch.nn.Linear, lr: float, weight_decay: float, train_x, train_y, val_x, val_y,
                 warmup_epochs: float, start_factor: float, seed: int) -> tuple[dict, int]:
    """One head as `cdft run` trains its parameters: torch.optim.Adam, set_rates' lr × factor per
    step, the epoch's image order, a view per epoch, model selection by validation accuracy (>=)."""
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = steps_per_epoch(COUNT, 1, BATCH, None)
    best, best_accuracy, best_epoch = None, -1.0, 0
    for epoch in range(EPOCHS):
        order = train_order(range(COUNT), seed=seed, epoch=epoch, rank=0, world_size=1)
        for index in range(steps):
            rows = torch.as_tensor(order[index * BATCH:(index + 1) * BATCH])
            optimizer.param_groups[0]["lr"] = lr * lr_factor(epoch * steps + index, round(warmup_epochs * steps),
                                                             EPOCHS * steps, start_factor)
            optimizer.zero_grad()
            F.cross_entropy(head(train_x[rows + (epoch % VIEWS) * COUNT]), train_y[rows]).backward()
            optimizer.step()
        with torch.no_grad():
            accuracy = float((head(val_x).argmax(1) == val_y).float().mean())
        if accuracy >= best_accuracy:
            best, best_accuracy, best_epoch = {k: v.clone() for k, v in head.state_dict().items()}, accuracy, epoch + 1
    return best, best_epoch


def test_the_sweeps_chosen_head_equals_that_head_trained_alone():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(CLASSES, DIM, generator=generator)
    train_y = torch.arange(COUNT) % CLASSES
    train_x = torch.cat([centres[train_y] + 0.8 * torch.randn(COUNT, DIM, generator=generator) for _ in range(VIEWS)])
    val_y = torch.arange(15) % CLASSES
    val_x = centres[val_y] + 1.5 * torch.randn(15, DIM, generator=generator)
    torch.manual_seed(3)
    head = torch.nn.Linear(DIM, CLASSES)
    start = {k: v.clone() for k, v in head.state_dict().items()}
    heads = grid([1e-3, 1e-2, 1e-1], [0.0, 1e-2])
    result = sweep(head, heads, train_x, train_y, val_x, val_y, epochs=EPOCHS, batch_size=BATCH, seed=5,
                   views=VIEWS, warmup_epochs=1.0, warmup_start_factor=0.1)
    assert len(result.losses) == EPOCHS and len(result.losses[0]) == len(heads)
    assert torch.equal(head.weight, start["weight"])  # the template is left as it was
    choice = chosen_head(result.best_accuracy)
    assert result.best_accuracy[choice] == max(result.best_accuracy)
    for h in {choice, 0, len(heads) - 1}:  # the chosen head, and the grid's corners
        alone_head = torch.nn.Linear(DIM, CLASSES)
        alone_head.load_state_dict(start)
        alone, epoch = _train_alone(alone_head, *heads[h], train_x, train_y, val_x, val_y, 1.0, 0.1, seed=5)
        assert epoch == result.best_epoch[h], h
        for name, value in alone.items():
            assert torch.allclose(result.params[name][h], value, atol=1e-5), (h, name)
    assert not torch.allclose(result.params["weight"][0], result.params["weight"][-1])  # they differ
    assert chosen_head([0.5, 0.75, 0.75]) == 1  # ties: the first in grid order


def _probe_args(root: str, split: str, *extra: str) -> list[str]:
    return ["probe", "--dataset", "breakhis", "--data-root", root, "--split-file", split, "--val-fold", "1",
            "--test-fold", "3", "--backbone", "test_vit", "--no-pretrained", "--image-size", "32", "--epochs", "4",
            "--batch-size", "8", "--warmup-epochs", "0.5", "--num-workers", "0", "--device", "cpu", *extra]


def test_probe_writes_a_run_that_cdft_eval_reproduces(tmp_path_factory, tmp_path):
    root, split = engine_data(tmp_path_factory)
    run = tmp_path / "sweep"
    code, out, err = invoke(*_probe_args(root, split, "--lrs", "1e-3,1e-2,1e-1", "--weight-decays", "0,1e-3",
                                         "--output", str(run)))
    assert code == 0, err
    assert err.count("feature cache built") == 3  # train (no augmentation), val, test
    summary = read_json(run / "summary.json")
    probe = summary["probe"]
    assert summary["kind"] == "probe" and summary["strategy"] == "linear" and summary["adapter"] == "none"
    assert len(probe["heads"]) == 6 and probe["lrs"] == [1e-3, 1e-2, 1e-1] and probe["weight_decays"] == [0, 1e-3]
    chosen = probe["heads"][probe["chosen"] - 1]
    assert summary["test"] == chosen["test"] and summary["val"] == chosen["val"]
    assert chosen["val"]["accuracy"] == max(h["val"]["accuracy"] for h in probe["heads"])
    assert "heads (chosen by validation accuracy: *)" in out and "tensorboard" not in out
    for name in ("config.yaml", "environment.json", "train.log", "confusion_matrix.csv", "stage1-linear/best.json"):
        assert (run / name).is_file(), name
    lines = metric_lines(run)
    assert len([line for line in lines if line["split"] == "val"]) == 6 * 4 + 6
    assert len([line for line in lines if line["split"] == "test"]) == 6

    code, out, err = invoke("eval", str(run), "--json")  # the images through the whole model: the same numbers
    assert code == 0, err
    assert json.loads(out)["metrics"] == summary["test"]
    code, out, err = invoke("eval", str(run), "--split", "val", "--json")
    assert code == 0 and json.loads(out)["metrics"] == summary["val"]

    alone = tmp_path / "alone"  # the chosen head trained by itself, from the cached features
    code, _, err = invoke(*_probe_args(root, split, "--lrs", str(chosen["lr"]), "--weight-decays",
                                       str(chosen["weight_decay"]), "--output", str(alone)))
    assert code == 0, err
    assert err.count("feature cache reused") == 3 and "feature cache built" not in err
    swept, single = load_file(str(run / "stage1-linear/best.safetensors")), load_file(str(alone / "stage1-linear/best.safetensors"))
    assert torch.allclose(swept["head.weight"], single["head.weight"], atol=1e-5)
    assert all(torch.equal(swept[k], single[k]) for k in swept if k.startswith("backbone."))
    assert read_json(alone / "summary.json")["best_epoch"] == summary["best_epoch"]


@pytest.mark.slow
def test_a_probe_s_config_repeats_its_chosen_head_with_cdft_run(tmp_path_factory, tmp_path):
    """Its config.yaml records `augment: none` (the plain features it trained on), not the
    default `paper`: `cdft run --config` then trains what the probe trained, and reports
    group it with linear runs trained without augmentation."""
    import yaml

    root, split = engine_data(tmp_path_factory)
    probe_dir, repeat = tmp_path / "probe", tmp_path / "repeat"
    code, _, err = invoke(*_probe_args(root, split, "--lrs", "1e-3,1e-2", "--weight-decays", "0",
                                       "--output", str(probe_dir)))
    assert code == 0, err
    summary = read_json(probe_dir / "summary.json")
    probe = summary["probe"]
    assert [h["head"] for h in probe["heads"]] == [1, 2]
    chosen = next(h for h in probe["heads"] if h["head"] == probe["chosen"])
    config = yaml.safe_load((probe_dir / "config.yaml").read_text())
    assert config["augment"] == "none" and config["lr"] == chosen["lr"] and config["strategy"] == "linear"
    code, _, err = invoke("run", "--config", str(probe_dir / "config.yaml"), "--output", str(repeat))
    assert code == 0, err
    again = read_json(repeat / "summary.json")
    for name in ("val", "test"):
        assert again[name]["accuracy"] == summary[name]["accuracy"], name
        assert again[name]["loss"] == pytest.approx(summary[name]["loss"], abs=1e-5), name


def test_probe_on_augmented_views_and_bad_grids(tmp_path_factory, tmp_path):
    root, split = engine_data(tmp_path_factory)
    code, _, err = invoke(*_probe_args(root, split, "--lrs", "1e-2", "--train-views", "2", "--output",
                                       str(tmp_path / "views")))
    assert code == 0, err
    assert "train, 24 images x 2 augmented views" in err
    assert read_json(tmp_path / "views" / "summary.json")["train_views"] == 2
    assert "augment: paper" in (tmp_path / "views" / "config.yaml").read_text()  # trained on augmented views
    for option, value, message in (("--lrs", "0", "--lrs must be positive"), ("--lrs", "a,b", "comma-separated"),
                                   ("--weight-decays", "-1", "must not be negative"), ("--lrs", ",", "at least one"),
                                   ("--weight-decays", "nan", "--weight-decays must be finite numbers, got nan"),
                                   ("--weight-decays", "1e400", "--weight-decays must be finite numbers, got inf")):
        code, _, err = invoke(*_probe_args(root, split, option, value, "--output", str(tmp_path / "x")))
        assert code == 2 and message in err, err
    assert not (tmp_path / "x").exists()
    assert math.isfinite(read_json(tmp_path / "views" / "summary.json")["test"]["loss"])


@pytest.mark.parametrize("option", ["--strategy", "--lr", "--adapter"])
def test_probe_has_no_options_that_would_change_what_a_probe_is(option):
    code, _, err = invoke("probe", option, "x")
    assert code == 2 and "No such option" in err
