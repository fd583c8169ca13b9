"""`cdft cv`: each protocol states its rotations; a cross-validation runs one child per
rotation, each tested on its own fold; cv_summary.json holds statistics that the children's
summaries reproduce; a cross-validation stopped in the middle of a rotation resumes to the
same summary; a rotation's torchrun command line rebuilds its configuration exactly."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers_data import hcrf_root
from helpers_engine import engine_data, invoke, quick_args, read_json, run_subprocess

from cdft_core.config import RunConfig, merge
from cdft_core.data.folds import (
    LOW_DATA,
    STANDARD,
    FoldProtocol,
    fold_rotations,
    low_data_rotations,
    standard_rotations,
)
from cdft_core.errors import CdftError, UsageError

_CACHE: dict[str, Path] = {}
FOLDS = 3


def _three_folds(factory) -> tuple[str, str]:
    """(data root, split file) of the engine tests' synthetic BreakHis, split into 3 patient-level folds."""
    root, _ = engine_data(factory)
    if "split" not in _CACHE:
        from cdft_core.data.splits import prepare
        from cdft_core.data.tables import write_split_file

        path = factory.mktemp("cv-split") / "splits3.csv"
        write_split_file(prepare("breakhis", root, folds=FOLDS, seed=1), str(path))
        _CACHE["split"] = path
    return root, str(_CACHE["split"])


def _cv_args(factory, *extra: str) -> list[str]:
    """`cdft run`'s quick options (tiny model, 32 px, 1 epoch of 2 steps) as `cdft cv` options."""
    root, split = _three_folds(factory)
    args = quick_args(root, split, strategy="linear", epochs=1, extra=("--max-steps-per-epoch", "2", "--no-tensorboard"))
    for option in ("--val-fold", "--test-fold"):  # each rotation sets its own
        del args[args.index(option):args.index(option) + 2]
    return ["cv", *args[1:], *extra]


def _reference(factory) -> Path:
    """A complete, uninterrupted 3-rotation cross-validation (once per test process)."""
    if "reference" not in _CACHE:
        parent = factory.mktemp("cv-reference") / "cv"
        code, out, err = invoke(*_cv_args(factory, "--output", str(parent)))
        assert code == 0, err
        _CACHE["reference"], _CACHE["stdout"] = parent, out
    return _CACHE["reference"]


# -- rotations --------------------------------------------------------------------------
def test_standard_rotations_test_every_fold_once_and_validate_on_the_next():
    assert standard_rotations(3) == [(1, 0), (2, 1), (0, 2)]
    assert fold_rotations(STANDARD, [0, 1, 2, 3, 4]) == [(1, 0), (2, 1), (3, 2), (4, 3), (0, 4)]
    assert fold_rotations(STANDARD, [3, 5, 9]) == [(5, 3), (9, 5), (3, 9)]  # positions in the folds present
    tested = [STANDARD.select(range(5), v, t)["test"] for v, t in fold_rotations(STANDARD, range(5))]
    assert tested == [[0], [1], [2], [3], [4]]


def test_low_data_rotations_train_on_every_fold_once_starting_with_the_papers_run():
    pairs = fold_rotations(LOW_DATA, [0, 1, 2, 3])
    assert pairs == low_data_rotations(4) == [(0, 1), (1, 2), (2, 3), (3, 0)]
    assert pairs[0] == (0, 1)  # configs/hcrf-*.yaml: val_fold 0, test_fold 1
    splits = [LOW_DATA.select([0, 1, 2, 3], v, t) for v, t in pairs]
    assert [s["train"] for s in splits] == [[1], [2], [3], [0]]
    assert [s["test"] for s in splits] == [[2, 3], [0, 3], [0, 1], [1, 2]]


def test_a_protocol_without_or_with_broken_rotations_is_refused():
    def select(folds, val_fold, test_fold):
        return {"train": [], "val": [val_fold], "test": [test_fold]}

    with pytest.raises(UsageError, match="declares no cross-validation rotations"):
        fold_rotations(FoldProtocol("plugin", "no rotations", select), [0, 1, 2])
    with pytest.raises(CdftError, match="invalid rotations"):
        fold_rotations(FoldProtocol("bad", "same fold twice", select, lambda k: [(0, 0)]), [0, 1, 2])
    with pytest.raises(CdftError, match="invalid rotations"):
        fold_rotations(FoldProtocol("bad", "out of range", select, lambda k: [(0, k)]), [0, 1, 2])
    own = FoldProtocol("pairs", "a plugin's own", select, lambda k: [(0, 1), (2, 1)])
    assert fold_rotations(own, [0, 1, 2]) == [(0, 1), (2, 1)]


def test_hcrf_plans_its_low_data_rotations(tmp_path_factory):
    from cdft_core.experiments.cv import plan_cv, rotation_config

    overrides = {"dataset": "hcrf", "data_root": hcrf_root(tmp_path_factory), "backbone": "test_vit",
                 "pretrained": False, "image_size": 32, "device": "cpu", "output": str(tmp_path_factory.mktemp("h") / "cv")}
    plan = plan_cv(overrides, rotations=[0, 3])
    assert plan.protocol == "low-data" and plan.folds == [0, 1, 2, 3]
    assert [(r.val_fold, r.test_fold) for r in plan.rotations] == [(0, 1), (1, 2), (2, 3), (3, 0)]
    assert plan.selected == [0, 3]
    assert (rotation_config(plan, plan.rotations[3]).val_fold, rotation_config(plan, plan.rotations[3]).test_fold) == (3, 0)
    assert not Path(overrides["output"]).exists()  # planning creates nothing


def test_a_split_file_with_folds_written_as_floats_plans_like_cdft_run_reads_it(tmp_path_factory, tmp_path):
    """pandas writes a fold column with an empty cell as 0.0, 1.0...: `cdft run` reads those as
    folds, so the cv plan must too; a fold that is no whole number is named with its line."""
    from cdft_core.experiments.cv import plan_cv

    root, split = engine_data(tmp_path_factory)
    table = pd.read_csv(split, dtype=str, keep_default_na=False)
    table["fold"] = [f"{int(f)}.0" for f in table["fold"]]
    floats = tmp_path / "floats.csv"
    table.to_csv(floats, index=False)
    overrides = {"dataset": "breakhis", "data_root": root, "split_file": str(floats), "backbone": "test_vit",
                 "pretrained": False, "image_size": 32, "device": "cpu", "output": str(tmp_path / "cv")}
    plan = plan_cv(overrides)
    assert plan.folds == sorted({int(f) for f in pd.read_csv(split)["fold"]})
    table.loc[3, "fold"] = "1.5"
    table.to_csv(floats, index=False)
    with pytest.raises(UsageError, match=r"line 5: fold '1\.5' is not an integer"):
        plan_cv(overrides)


# -- statistics and command lines ---------------------------------------------------------
def test_statistics_are_the_sample_std_and_a_student_t_interval():
    from scipy import stats

    from cdft_core.experiments.cv_summary import describe

    values = [0.8, 0.9, 0.75, 0.85]
    got = describe(values)
    assert got["n"] == 4 and got["mean"] == pytest.approx(statistics.mean(values))
    assert got["std"] == pytest.approx(statistics.stdev(values))
    low, high = stats.t.interval(0.95, 3, loc=statistics.mean(values), scale=statistics.stdev(values) / 2)
    assert got["ci95"] == pytest.approx([low, high])
    assert describe([0.7]) == {"n": 1, "mean": 0.7, "std": None, "ci95": None}


def test_a_rotations_worker_command_line_rebuilds_its_configuration():
    """What torchrun's workers run for a rotation (`--nproc-per-node`): parsed by `cdft run`'s
    own parser, it gives back the rotation's configuration, option dictionaries and switches included."""
    from cdft_cli.run import config_overrides, run_command
    from cdft_core.experiments.commands import changed_values, option_args

    config = merge(RunConfig(), {
        "dataset": "breakhis", "data_root": "/data/with space", "val_fold": 2, "test_fold": 1, "backbone": "test_vit",
        "pretrained": False, "tensorboard": False, "cache": True, "image_size": 32, "strategy": "staged",
        "strategy_options": {"lr_factor": 0.1, "stage_epochs": "2,3"}, "dataset_options": {"magnification": "200X"},
        "adapter_options": {"residual": False}, "lr": 3e-05, "warmup_epochs": 0.5, "num_workers": 0,
        "max_steps_per_epoch": 2, "output": "/runs/cv/rotation-1",
    }, source="test")
    args = ["run", *option_args(changed_values(config))]
    ctx = run_command.make_context("run", args[1:])
    assert merge(RunConfig(), config_overrides(ctx.params), source="parsed") == config


def test_cv_refuses_what_its_rotations_decide(tmp_path_factory, tmp_path):
    for option in ("--val-fold", "--test-fold"):
        code, _, err = invoke(*_cv_args(tmp_path_factory, option, "2", "--output", str(tmp_path / "a")))
        assert code == 2 and f"drop {option}" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = invoke(*_cv_args(tmp_path_factory, "--rotations", "0,3", "--output", str(tmp_path / "b")))
    assert code == 2 and "--rotations 3 does not exist" in err and "rotations 0..2" in err, err
    code, _, err = invoke(*_cv_args(tmp_path_factory, "--rotations", "0,x"))
    assert code == 2 and "comma-separated rotation numbers" in err, err
    assert not list(tmp_path.iterdir())  # nothing created


# -- end to end ---------------------------------------------------------------------------
@pytest.mark.slow
def test_cv_runs_one_child_per_rotation_and_summarises_them(tmp_path_factory):
    parent = _reference(tmp_path_factory)
    root, split = _three_folds(tmp_path_factory)
    rows = pd.read_csv(split)
    assert sorted(p.name for p in parent.iterdir()) == [".cdft-run", "config.yaml", "cv.json", "cv_summary.json",
                                                         "rotation-0", "rotation-1", "rotation-2"]
    cv = read_json(parent / "cv_summary.json")
    children = []
    for r in range(FOLDS):
        child = parent / f"rotation-{r}"
        config = yaml.safe_load((child / "config.yaml").read_text())
        assert (config["test_fold"], config["val_fold"]) == (r, (r + 1) % FOLDS)  # tested on its own fold
        summary = read_json(child / "summary.json")
        assert summary["images"]["test"] == int((rows["fold"] == r).sum())
        assert summary["images"]["val"] == int((rows["fold"] == (r + 1) % FOLDS).sum())
        assert cv["rotations"][r] | {"metrics": None} == {
            "rotation": r, "val_fold": (r + 1) % FOLDS, "test_fold": r, "run_dir": f"rotation-{r}",
            "best_stage": "linear", "best_epoch": 1, "images": summary["images"], "metrics": None}
        children.append(summary)
    assert cv["protocol"] == "standard" and cv["folds"] == [0, 1, 2] and cv["parent"] == str(parent)

    scalars = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_paper")
    for split_name in ("test", "val"):
        for name in scalars:
            values = [child[split_name][name] for child in children]
            stats = cv["metrics"][f"{split_name}/{name}"]
            assert stats["n"] == FOLDS
            assert stats["mean"] == pytest.approx(statistics.mean(values), abs=1e-12)
            assert stats["std"] == pytest.approx(statistics.stdev(values), abs=1e-12)
            assert stats["ci95"][0] <= stats["mean"] <= stats["ci95"][1]
    per_class = [c["test"]["per_class"]["DC"]["recall"] for c in children if c["test"]["per_class"]["DC"]["present"]]
    assert cv["metrics"]["test/recall[DC]"]["mean"] == pytest.approx(statistics.mean(per_class), abs=1e-12)

    shared = yaml.safe_load((parent / "config.yaml").read_text())
    assert shared["output"] == str(parent) and shared["strategy"] == "linear"
    out = _CACHE["stdout"]
    accuracy = next(line for line in out.splitlines() if line.startswith("test/accuracy"))
    assert f"{cv['metrics']['test/accuracy']['mean']:.4f}" in accuracy and "95% CI" in out

    code, _, err = invoke("cv", "--resume", str(parent))
    assert code == 2 and "is complete" in err
    code, _, err = invoke("run", "--resume", str(parent))
    assert code == 2 and "is a cross-validation directory" in err and "cdft cv --resume" in err
    code, _, err = invoke("eval", str(parent / "rotation-1"), "--json")
    assert code == 0, err  # each child is an ordinary run
    code, _, err = invoke("eval", str(parent))  # the parent is not one run: say what it is and what to do
    assert code == 2 and err.strip() == (f"cdft: error: {str(parent)!r} is a cross-validation directory, not one run; "
                                         f"name one of its rotation-N runs (e.g. {parent / 'rotation-0'}), or "
                                         f"summarise them with `cdft report {parent}`")
    picture = next(Path(root).rglob("*.png"))
    code, _, err = invoke("predict", str(parent.parent), str(picture), "-o", str(parent.parent / "p.csv"))
    assert code == 2 and "runs, not one (a grid's or a runs folder); name one of them" in err, err
    assert not (parent.parent / "p.csv").exists()


@pytest.mark.slow
def test_cv_stopped_mid_rotation_resumes_to_the_same_summary(tmp_path_factory, tmp_path, monkeypatch):
    from cdft_core.training import engine
    from cdft_core.training.faults import FAULT_ENV

    reference = read_json(_reference(tmp_path_factory) / "cv_summary.json")
    parent = tmp_path / "cv"
    real_main, calls = engine.main, []

    def second_rotation_preempted(config, resume=None, argv=None):
        calls.append(config.output)
        if len(calls) == 2:  # SIGTERM in the middle of rotation 1's only epoch, as a scheduler would send it
            monkeypatch.setenv(FAULT_ENV, "stage=1,epoch=1,step=1,action=sigterm")
        return real_main(config, resume=resume, argv=argv)

    monkeypatch.setattr(engine, "main", second_rotation_preempted)
    code, _, err = invoke(*_cv_args(tmp_path_factory, "--output", str(parent)))
    assert code == 143, err
    assert "rotation 1 (2/3" in err and f"cdft cv --resume {parent}" in err and "Traceback" not in err
    assert (parent / "rotation-0" / "summary.json").is_file()
    assert not (parent / "rotation-1" / "summary.json").exists()
    assert [p.name for p in (parent / "rotation-1" / "resume").glob("*.json")] == ["s00-e00000-b0000001.json"]
    assert not (parent / "rotation-2").exists() and not (parent / "cv_summary.json").exists()

    monkeypatch.delenv(FAULT_ENV)
    monkeypatch.setattr(engine, "main", real_main)
    code, out, err = invoke("cv", "--resume", str(parent), "--num-workers", "0")
    assert code == 0, err
    assert "rotation 0 (1/3: val fold 1, test fold 0) is complete: skipped" in err
    assert "rotation 1 (2/3: val fold 2, test fold 1) resumes" in err and "1 steps of epoch 1" in err
    resumed = read_json(parent / "cv_summary.json")
    assert resumed["metrics"] == reference["metrics"]
    assert [r["metrics"] for r in resumed["rotations"]] == [r["metrics"] for r in reference["rotations"]]


@pytest.mark.slow
@pytest.mark.distributed
def test_cv_launches_each_rotation_on_torchrun_workers(tmp_path_factory, tmp_path):
    parent = tmp_path / "cv"
    done = run_subprocess(*_cv_args(tmp_path_factory, "--rotations", "2", "--nproc-per-node", "2",
                                    "--output", str(parent)), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = read_json(parent / "rotation-2" / "summary.json")
    assert summary["world_size"] == 2
    cv = read_json(parent / "cv_summary.json")
    assert [r["rotation"] for r in cv["rotations"]] == [2] and cv["metrics"]["test/accuracy"]["std"] is None
    assert json.loads((parent / "cv.json").read_text())["selected"] == [2]
    assert not (parent / "rotation-0").exists()
    assert math.isclose(cv["metrics"]["test/accuracy"]["mean"], summary["test"]["accuracy"])
