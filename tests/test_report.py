"""`cdft report`: on a cv directory it writes the table (the numbers of cv_summary.json), the
plots and one self-contained HTML page; incomplete runs are listed and never averaged in;
grids and single runs mix; paired comparisons pair the same splits; the output directory
is guarded; a real tiny `cdft cv` reports end to end.

Most trees here are written by :func:`fake_run` — plausible run directories (config.yaml,
metrics.jsonl, predictions.csv, summary.json with metrics computed from those
predictions) that take milliseconds instead of a training run each.
"""

from __future__ import annotations

import csv
import json
import math
import os
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers_engine import engine_data, invoke, quick_args

CLASSES = ["DC", "LC", "MC", "PC"]
STAGES = [("frt", 2), ("full", 2)]


# -- a plausible run tree, written directly --------------------------------------------------
def fake_run(path: Path, *, dataset: str = "breakhis", backbone: str = "vit_b", strategy: str = "staged",
             seed: int = 1, val_fold: int = 1, test_fold: int = 0, skill: float = 2.0, images: int = 24,
             complete: bool = True, predictions: bool = True, classes: list[str] = CLASSES,
             extra_config: dict | None = None) -> dict | None:
    """A run directory like the engine's; returns its summary (None when left incomplete)."""
    from cdft_core.training.metrics import compute_metrics

    rng = np.random.default_rng(zlib.crc32(f"{path.name}-{seed}-{skill}".encode()))
    path.mkdir(parents=True)
    config = {"dataset": dataset, "data_root": "/data", "split_file": "/data/s.csv", "val_fold": val_fold,
              "test_fold": test_fold, "dataset_options": {"magnification": "200X"}, "backbone": backbone,
              "adapter": "cdtm", "strategy": strategy, "lr": 1e-4, "epochs": 2, "seed": seed, "num_workers": 0,
              "output": str(path), **(extra_config or {})}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / ".cdft-run").write_text("cdft run directory\n")
    lines = []
    for index, (stage, epochs) in enumerate(STAGES):
        for epoch in range(1, epochs + 1):
            accuracy = float(min(1.0, 0.3 + 0.1 * skill * epoch * (index + 1) + rng.normal(0, 0.02)))
            lines.append({"stage": stage, "stage_index": index + 1, "epoch": epoch, "split": "train", "loss": 1.0})
            lines.append({"stage": stage, "stage_index": index + 1, "epoch": epoch, "split": "val",
                          "accuracy": accuracy, "loss": 1.5 - accuracy})
        (path / f"stage{index + 1}-{stage}").mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if not complete:
        return None
    splits = {}
    rows = []
    for split in ("val", "test"):
        labels = np.arange(images) % len(classes)
        logits = rng.normal(0, 1, (images, len(classes))) + skill * np.eye(len(classes))[labels]
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        groups = [f"p{i // 3}" for i in range(images)]
        splits[split] = {**compute_metrics(labels, probs, classes), "loss": 0.5,
                         "patient_recognition_rate": 0.5 + 0.1 * skill, "patient_accuracy": 0.6 + 0.1 * skill}
        rows += [[split, f"img{i}.png", groups[i], int(labels[i]), classes[labels[i]], int(probs[i].argmax()),
                  classes[probs[i].argmax()], *(repr(float(p)) for p in probs[i])] for i in range(images)]
    final = f"stage{len(STAGES)}-{STAGES[-1][0]}"
    if predictions:
        with open(path / final / "predictions.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["split", "image_path", "group", "label", "label_name", "predicted", "predicted_name",
                             *(f"prob_{c}" for c in classes)])
            writer.writerows(rows)
    summary = {"status": "complete", "run_dir": str(path), "dataset": dataset, "protocol": "standard",
               "backbone": backbone, "adapter": "cdtm", "strategy": strategy, "seed": seed, "classes": classes,
               "images": {"train": 40, "val": images, "test": images}, "best_stage": STAGES[-1][0], "best_epoch": 2,
               "val": splits["val"], "test": splits["test"], "checkpoint": f"{final}/best.safetensors",
               "stages": [{"index": len(STAGES), "name": STAGES[-1][0], "checkpoint": f"{final}/best.safetensors"}]}
    (path / "summary.json").write_text(json.dumps(summary))
    return summary


def fake_cv(parent: Path, *, rotations: int = 3, incomplete: dict[int, str] | None = None, **run) -> dict | None:
    """A cv parent like `cdft cv`'s: rotations[i] tests fold i, validates on i+1; ``incomplete``
    maps a rotation to ``"started"`` (no summary.json) or ``"new"`` (no folder). cv_summary.json
    is written, by cdft's own function, when every rotation is complete."""
    from cdft_core.experiments.cv_summary import cv_summary

    incomplete = incomplete or {}
    parent.mkdir(parents=True)
    (parent / ".cdft-run").write_text("cdft run directory\n")
    (parent / "config.yaml").write_text(yaml.safe_dump({"dataset": run.get("dataset", "breakhis")}))
    plan = [{"rotation": r, "val_fold": (r + 1) % rotations, "test_fold": r, "run_dir": f"rotation-{r}"}
            for r in range(rotations)]
    (parent / "cv.json").write_text(json.dumps({"protocol": "standard", "folds": list(range(rotations)),
                                                "rotations": plan, "selected": list(range(rotations))}))
    summaries = []
    for r in plan:
        if incomplete.get(r["rotation"]) == "new":
            continue
        summaries.append(fake_run(parent / r["run_dir"], val_fold=r["val_fold"], test_fold=r["test_fold"],
                                  complete=r["rotation"] not in incomplete, **run))
    if incomplete:
        return None
    header = {"kind": "cv", "parent": str(parent), "dataset": run.get("dataset", "breakhis"), "protocol": "standard",
              "backbone": run.get("backbone", "vit_b"), "strategy": run.get("strategy", "staged"), "seed": 1,
              "folds": list(range(rotations))}
    summary = cv_summary(header, plan, summaries)
    (parent / "cv_summary.json").write_text(json.dumps(summary))
    return summary


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


class _Page(HTMLParser):
    """Records the tags, images and text of a page; unbalanced tags fail the test."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.images: list[str] = []
        self.external: list[str] = []
        self.text: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        values = dict(attrs)
        if tag == "img":
            self.images.append(values.get("src", ""))
        for name in ("src", "href"):
            value = values.get(name) or ""
            if value and not value.startswith(("data:", "#")):
                self.external.append(value)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-3:])
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse_page(path: Path) -> _Page:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    page = _Page()
    page.feed(text)
    page.close()
    assert not page.stack, page.stack
    return page


# -- the two promises ---------------------------------------------------------------
def test_a_cv_directory_gives_the_table_of_its_summary_the_plots_and_one_html_page(tmp_path):
    summary = fake_cv(tmp_path / "runs" / "cv", rotations=3)
    out = tmp_path / "report"
    code, stdout, stderr = invoke("report", str(tmp_path / "runs"), "-o", str(out))
    assert code == 0, stderr

    rows = read_csv(out / "results.csv")
    assert len(rows) == 1
    row = rows[0]
    assert (row["dataset"], row["backbone"], row["strategy"], row["runs"]) == ("breakhis", "vit_b", "staged", "3")
    compared = [name for name in summary["metrics"] if name.startswith("test/") and "[" not in name]
    assert {"test/accuracy", "test/f1_macro", "test/f1_paper"} <= set(compared)
    for name in compared:
        metric, expected = name.split("/", 1)[1], summary["metrics"][name]
        assert int(row[f"{metric}_n"]) == expected["n"]
        assert float(row[f"{metric}_mean"]) == expected["mean"]  # the same numbers, not merely close ones
        assert float(row[f"{metric}_std"]) == expected["std"]
        assert [float(row[f"{metric}_ci95_low"]), float(row[f"{metric}_ci95_high"])] == expected["ci95"]
    # the multi-class ROC-AUC (absent from the summary) comes from the predictions, per run
    assert row["roc_auc_n"] == "3" and 0.5 < float(row["roc_auc_mean"]) <= 1
    assert float(row["patient_accuracy_mean"]) == pytest.approx(0.8)

    accuracy = summary["metrics"]["test/accuracy"]
    shown = f"{accuracy['mean']:.4f} ± {accuracy['std']:.4f}"
    assert shown in stdout  # printed
    assert shown in (out / "results.md").read_text()
    assert "| breakhis | vit_b | staged | 3 |" in (out / "results.md").read_text()
    tex = (out / "results.tex").read_text()
    assert f"{accuracy['mean']:.4f} $\\pm$ {accuracy['std']:.4f}" in tex and "vit\\_b" in tex

    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == ["confusion-breakhis-vit_b-staged.png", "learning-breakhis-vit_b-staged.png",
                     "roc-breakhis-vit_b-staged.png", "strategies-breakhis.png"]
    assert all((out / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)

    page = parse_page(out / "report.html")
    assert len(page.images) == 4 and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert not page.external  # nothing fetched from anywhere
    assert {"html", "head", "body", "title", "table"} <= page.tags
    assert shown in "".join(page.text)
    assert (out / "comparisons.csv").read_text().startswith("dataset,compares,")


def test_incomplete_runs_are_listed_and_never_averaged_in(tmp_path):
    parent = tmp_path / "cv"
    fake_cv(parent, rotations=4, incomplete={2: "started", 3: "new"})
    done = [json.loads((parent / f"rotation-{r}" / "summary.json").read_text()) for r in (0, 1)]
    out = tmp_path / "report"
    code, stdout, stderr = invoke("report", str(parent), "-o", str(out))
    assert code == 0, stderr

    row = read_csv(out / "results.csv")[0]
    assert row["runs"] == row["accuracy_n"] == "2"
    assert float(row["accuracy_mean"]) == pytest.approx(sum(s["test"]["accuracy"] for s in done) / 2)
    for where in (stdout, "".join(parse_page(out / "report.html").text)):
        assert f"{parent / 'rotation-2'}: not finished: no summary.json (last logged: stage full, epoch 2)" in where
        assert f"{parent / 'rotation-3'}: not started" in where
    assert "2 of 4" in "".join(parse_page(out / "report.html").text)  # the parent: rotations complete of chosen

    from cdft_core.reports.collect import collect
    from cdft_core.reports.plots import learning_series
    from cdft_core.reports.rows import build_rows

    (row_,) = build_rows(collect([str(parent)]).runs, "test")
    curves = learning_series(row_)
    assert all(len(values) == 2 for metrics in curves.values() for per_epoch in metrics.values()
               for values in per_epoch.values())  # the started rotation's epochs are not in the curves


def test_nothing_complete_still_reports_what_was_found(tmp_path):
    fake_run(tmp_path / "runs" / "a", complete=False)
    code, stdout, stderr = invoke("report", str(tmp_path / "runs"), "-o", str(tmp_path / "out"))
    assert code == 0, stderr
    assert "no complete run" in stdout and "not finished" in stdout
    assert read_csv(tmp_path / "out" / "results.csv") == []
    parse_page(tmp_path / "out" / "report.html")


# -- grids, single runs, comparisons -------------------------------------------------------
def test_a_grid_and_single_runs_mix_and_pairs_are_compared_on_the_same_splits(tmp_path):
    grid = tmp_path / "grid"
    for strategy, skill in (("linear", 1.0), ("full", 2.5)):
        fake_cv(grid / f"breakhis-vit_b-{strategy}", rotations=5, strategy=strategy, skill=skill)
    fake_cv(grid / "breakhis-convnext-full", rotations=3, backbone="convnext", strategy="full", skill=2.0)
    (grid / "breakhis-vit_b-linear.log").write_text("cdft cv ...\n")
    fake_run(tmp_path / "single" / "run1", backbone="convnext", strategy="linear", seed=7)
    out = tmp_path / "report"
    code, stdout, stderr = invoke("report", str(grid), str(tmp_path / "single"), str(grid / "breakhis-vit_b-full"),
                                  "-o", str(out))
    assert code == 0, stderr

    table = {(r["backbone"], r["strategy"]): r["runs"] for r in read_csv(out / "results.csv")}
    assert table == {("convnext", "full"): "3", ("convnext", "linear"): "1", ("vit_b", "full"): "5",
                     ("vit_b", "linear"): "5"}  # the cv named twice counts once
    comparisons = {(c["compares"], c["within"], c["a"], c["b"], c["metric"]): c
                   for c in read_csv(out / "comparisons.csv")}
    strategies = comparisons[("strategy", "vit_b", "full", "linear", "accuracy")]  # rows in name order: a − b
    assert strategies["n_pairs"] == "5" and "too small" not in strategies["note"]
    a = [json.loads((grid / f"breakhis-vit_b-{strategies['a']}" / f"rotation-{r}" / "summary.json").read_text())
         ["test"]["accuracy"] for r in range(5)]
    b = [json.loads((grid / f"breakhis-vit_b-{strategies['b']}" / f"rotation-{r}" / "summary.json").read_text())
         ["test"]["accuracy"] for r in range(5)]
    from scipy import stats

    assert float(strategies["mean_diff_a_minus_b"]) == pytest.approx(np.mean(np.subtract(a, b)))
    assert float(strategies["paired_t_p"]) == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert float(strategies["wilcoxon_p"]) == pytest.approx(stats.wilcoxon(a, b).pvalue)
    backbones = [c for key, c in comparisons.items() if key[:2] == ("backbone", "full") and key[4] == "accuracy"]
    # 3 folds against 5: rotation 2 validates on fold 0 in one and fold 3 in the other, so 2 pairs remain
    assert len(backbones) == 1 and backbones[0]["n_pairs"] == "2" and "n too small to mean much" in backbones[0]["note"]
    # the single convnext/linear run has seed 7: it pairs with nothing, so no comparison names it
    assert not [c for key, c in comparisons.items() if key[1] == "convnext" and key[0] == "strategy"]
    assert "paired comparisons" in stdout and "Paired comparisons" in (out / "report.html").read_text()


def test_paired_tests_handle_zero_constant_and_single_differences():
    from cdft_core.reports.compare import FEW_NOTE, paired_test

    same = paired_test([0.8, 0.9, 0.7], [0.8, 0.9, 0.7])
    assert same["mean_diff"] == 0 and same["wilcoxon_p"] == same["ttest_p"] == 1.0
    assert "all differences are zero" in same["notes"] and FEW_NOTE in same["notes"]
    constant = paired_test([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    assert constant["ttest_p"] is None and constant["wilcoxon_p"] is not None
    assert constant["mean_diff"] == pytest.approx(0.1) and FEW_NOTE not in constant["notes"]
    one = paired_test([0.9], [0.8])
    assert one["wilcoxon_p"] is None and one["ci95"] is None and "one pair: no test" in one["notes"]
    some_zero = paired_test([0.9, 0.8, 0.7, 0.65, 0.5], [0.9, 0.7, 0.6, 0.5, 0.45])
    assert math.isfinite(some_zero["ttest_p"]) and "zero differences dropped by the Wilcoxon test" in some_zero["notes"]


def test_runs_that_differ_in_a_setting_are_separate_rows(tmp_path):
    for seed, lr in ((1, 1e-4), (2, 1e-4), (3, 1e-3)):
        fake_run(tmp_path / "runs" / f"s{seed}", seed=seed, extra_config={"lr": lr, "num_workers": seed})
    code, stdout, stderr = invoke("report", str(tmp_path / "runs"), "-o", str(tmp_path / "out"))
    assert code == 0, stderr
    rows = {r["setting"]: r["runs"] for r in read_csv(tmp_path / "out" / "results.csv")}
    assert rows == {"lr=0.0001": "2", "lr=0.001": "1"}  # num_workers does not change what is measured
    assert "setting" in stdout


def test_long_settings_keep_the_figures_readable(tmp_path):
    """Rows told apart by long settings: the strategy chart gets one legend below its panels
    (inside an axes, a long label squeezed the bars to nothing) and titles wrap; matplotlib
    has nothing to warn about."""
    import warnings

    from PIL import Image

    long = {"batch_size": 2, "epochs": 3, "max_steps_per_epoch": 2, "strategy_options": {"lr_factor": 0.1}}
    for seed, extra in ((1, long), (2, {**long, "batch_size": 8, "epochs": 1}), (3, {})):
        fake_run(tmp_path / "runs" / f"s{seed}", seed=seed, extra_config=extra)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a collapsed constrained layout is a UserWarning
        code, _, stderr = invoke("report", str(tmp_path / "runs"), "-o", str(tmp_path / "out"))
    assert code == 0, stderr
    plots = tmp_path / "out" / "plots"
    chart = next(plots.glob("strategies-*.png"))
    width, height = Image.open(chart).size
    assert width >= 650 and height > 680  # the panels keep their size; the legend adds to the height


def test_a_setting_only_some_runs_have_and_an_unreadable_config_are_never_averaged_together(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs / "m40a", seed=1, extra_config={"dataset_options": {"magnification": 40}})
    fake_run(runs / "m40b", seed=2, extra_config={"dataset_options": {"magnification": 40}})
    fake_run(runs / "plain", seed=3, extra_config={"dataset_options": {}})
    fake_run(runs / "noconf", seed=4)
    (runs / "noconf" / "config.yaml").unlink()
    code, stdout, stderr = invoke("report", str(runs), "-o", str(tmp_path / "out"))
    assert code == 0, stderr
    rows = {r["setting"]: r["runs"] for r in read_csv(tmp_path / "out" / "results.csv")}
    assert rows == {"dataset.magnification=40": "2", "dataset.magnification=default": "1",
                    f"no config.yaml: {runs / 'noconf'}": "1"}


def test_a_partial_cross_validation_is_marked_and_unselected_rotations_are_excluded(tmp_path):
    parent = tmp_path / "cv"
    fake_cv(parent, rotations=5, incomplete={3: "started", 4: "new"})
    plan = json.loads((parent / "cv.json").read_text())
    fake_run(parent / "rotation-9", seed=9)  # complete, but in no plan
    out = tmp_path / "report"
    code, stdout, stderr = invoke("report", str(parent), "-o", str(out))
    assert code == 0, stderr
    (row,) = read_csv(out / "results.csv")
    assert row["runs"] == "3" and row["partial"] == "partial: 3/5 rotations"
    page = "".join(parse_page(out / "report.html").text)
    for where in (stdout, (out / "results.md").read_text(), page):
        assert "3 (partial: 3/5 rotations)" in where
    assert f"{parent / 'rotation-9'}: excluded: complete, but not a rotation of cv.json's plan" in stdout

    plan["selected"] = [0, 1]  # rotation 2 is complete but not chosen
    (parent / "cv.json").write_text(json.dumps(plan))
    out2 = tmp_path / "report2"
    code, stdout, stderr = invoke("report", str(parent), "-o", str(out2))
    assert code == 0, stderr
    (row,) = read_csv(out2 / "results.csv")
    assert row["runs"] == "2" and row["partial"] == ""
    assert "partial" not in (out2 / "results.md").read_text()
    assert (f"{parent / 'rotation-2'}: excluded: complete, but rotation 2 is not among cv.json's selected "
            "rotations (0, 1)") in stdout


def test_runs_without_predictions_skip_their_roc_curve_and_say_so(tmp_path):
    fake_run(tmp_path / "runs" / "old", predictions=False)
    fake_run(tmp_path / "runs" / "binary", backbone="other", predictions=False, classes=["benign", "malignant"])
    out = tmp_path / "out"
    code, stdout, stderr = invoke("report", str(tmp_path / "runs"), "-o", str(out))
    assert code == 0, stderr
    assert not list((out / "plots").glob("roc-*.png"))
    assert "no ROC curve for" in stderr and "no predictions.csv" in stderr
    assert "no predictions.csv" in "".join(parse_page(out / "report.html").text)
    rows = {r["backbone"]: r for r in read_csv(out / "results.csv")}
    assert rows["vit_b"]["roc_auc_n"] == ""  # four classes: no ROC-AUC without predictions
    assert rows["other"]["roc_auc_n"] == "1"  # two classes: the summary's own


def test_the_macro_roc_auc_is_scikit_learns_one_vs_rest(tmp_path):
    from sklearn.metrics import roc_auc_score

    from cdft_core.reports.predictions import macro_roc_auc, read_predictions

    fake_run(tmp_path / "run")
    predictions = read_predictions(str(tmp_path / "run" / "stage2-full" / "predictions.csv"), "test", CLASSES)
    expected = roc_auc_score(predictions.labels, predictions.probs, multi_class="ovr", average="macro")
    assert macro_roc_auc(predictions) == pytest.approx(expected)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert predictions.labels.tolist() == [i % 4 for i in range(summary["test"]["n"])]


# -- the output directory and errors --------------------------------------------------------
def test_the_output_directory_is_guarded_and_an_earlier_report_is_rewritten(tmp_path):
    fake_run(tmp_path / "runs" / "a")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("mine")
    code, _, err = invoke("report", str(tmp_path / "runs"), "-o", str(tmp_path / "busy"))
    assert code == 2 and err.count("\n") == 1 and "is not a cdft report directory" in err
    assert sorted(os.listdir(tmp_path / "busy")) == ["thesis.tex"]
    (tmp_path / "file").write_text("x")
    code, _, err = invoke("report", str(tmp_path / "runs"), "-o", str(tmp_path / "file"))
    assert code == 2 and "is a file" in err

    out = tmp_path / "runs" / "report"  # inside the searched tree: never read as runs
    assert invoke("report", str(tmp_path / "runs"), "-o", str(out))[0] == 0
    (out / "plots" / "confusion-stale.png").write_bytes(b"old")
    code, stdout, err = invoke("report", str(tmp_path / "runs"), "-o", str(out))
    assert code == 0, err
    assert not (out / "plots" / "confusion-stale.png").exists()
    assert "1 complete run(s) in 1 row(s)" in stdout


def test_no_runs_or_no_directory_is_a_usage_error(tmp_path):
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    code, _, err = invoke("report", str(tmp_path / "empty"), "-o", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1 and "no cdft runs found under" in err
    assert not (tmp_path / "out").exists()
    code, _, err = invoke("report", str(tmp_path / "missing"))
    assert code == 2 and "does not exist" in err
    code, _, err = invoke("report")
    assert code == 2


def test_the_command_is_listed():
    code, stdout, _ = invoke("--help")
    assert code == 0 and "report" in stdout


# -- end to end -----------------------------------------------------------------------------
@pytest.mark.slow
def test_a_real_tiny_cross_validation_reports_its_summary(tmp_path_factory):
    from cdft_core.data.splits import prepare
    from cdft_core.data.tables import write_split_file

    root, _ = engine_data(tmp_path_factory)
    base = tmp_path_factory.mktemp("report-cv")
    split = str(base / "splits3.csv")
    write_split_file(prepare("breakhis", root, folds=3, seed=1), split)
    args = quick_args(root, split, strategy="linear", epochs=1, extra=("--max-steps-per-epoch", "2", "--no-tensorboard"))
    for option in ("--val-fold", "--test-fold"):
        del args[args.index(option):args.index(option) + 2]
    code, _, err = invoke("cv", *args[1:], "--output", str(base / "cv"))
    assert code == 0, err

    out = base / "report"
    code, stdout, err = invoke("report", str(base / "cv"), "-o", str(out))
    assert code == 0, err
    summary = json.loads((base / "cv" / "cv_summary.json").read_text())
    row = read_csv(out / "results.csv")[0]
    assert (row["backbone"], row["strategy"], row["runs"]) == ("test_vit", "linear", "3")
    for name in ("accuracy", "f1_macro", "f1_paper"):
        assert float(row[f"{name}_mean"]) == summary["metrics"][f"test/{name}"]["mean"]
        assert float(row[f"{name}_std"]) == summary["metrics"][f"test/{name}"]["std"]
    plots = {p.name.split("-")[0] for p in (out / "plots").iterdir()}
    assert {"confusion", "learning", "strategies"} <= plots
    has_predictions = (base / "cv" / "rotation-0" / "stage1-linear" / "predictions.csv").exists()
    assert ("roc" in plots) == has_predictions  # older engines wrote none: skipped and said so
    page = parse_page(out / "report.html")
    assert any(src.startswith("data:image/png;base64,") for src in page.images)
