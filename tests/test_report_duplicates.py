"""`cdft report`: a run that repeats a split and seed of another run of its row (a cv that
repeats rotations of another) is a duplicate. The results table leaves it out by the very rule
the paired comparisons use — the row's n, mean and std are those of the distinct splits — and
says how many it left out, in every table and in the page.

The runs are :func:`test_report.fake_run` trees: no training.
"""

from __future__ import annotations

import json
from pathlib import Path

from helpers_engine import invoke
from test_report import fake_cv, fake_run, parse_page, read_csv

NOTE = "2 duplicate run(s) of one split and seed left out"


def _tree(root: Path) -> dict:
    """``cvF``: 3 rotations of frt; ``cvS``: rotations 0 and 2 again (same folds and seed, other
    values, so counting them would move the mean); ``cvL``: linear on the same 3 splits. Returns
    cvF's cv_summary."""
    summary = fake_cv(root / "cvF", rotations=3, strategy="frt", skill=2.0)
    for r in (0, 2):
        fake_run(root / "cvS" / f"rotation-{r}", val_fold=(r + 1) % 3, test_fold=r, strategy="frt", skill=0.3)
    fake_cv(root / "cvL", rotations=3, strategy="linear", skill=1.0)
    return summary


def test_duplicates_are_left_out_of_the_results_and_said_so(tmp_path):
    summary = _tree(tmp_path / "runs")
    out = tmp_path / "report"
    code, stdout, stderr = invoke("report", str(tmp_path / "runs" / "cvS"), str(tmp_path / "runs" / "cvF"),
                                  str(tmp_path / "runs" / "cvL"), "-o", str(out))
    assert code == 0, stderr

    rows = {r["strategy"]: r for r in read_csv(out / "results.csv")}
    frt = rows["frt"]
    assert (frt["runs"], frt["duplicates"], frt["accuracy_n"]) == ("3", "2", "3")
    expected = summary["metrics"]["test/accuracy"]  # the three distinct splits: cvF's own numbers
    assert float(frt["accuracy_mean"]) == expected["mean"] and float(frt["accuracy_std"]) == expected["std"]
    assert (rows["linear"]["runs"], rows["linear"]["duplicates"]) == ("3", "0")

    cell = f"3 ({NOTE})"
    shown = f"{expected['mean']:.4f} ± {expected['std']:.4f}"
    assert f"| breakhis | vit_b | frt | {cell} | {shown} |" in (out / "results.md").read_text()
    assert "| breakhis | vit_b | linear | 3 |" in (out / "results.md").read_text()
    assert cell in stdout and shown in stdout
    assert cell in (out / "results.tex").read_text()
    page = "".join(parse_page(out / "report.html").text)
    assert cell in page and f"frt (n=3; {NOTE})" in page

    # the comparisons apply the same rule: their n and their note agree with the row's
    accuracy = next(c for c in read_csv(out / "comparisons.csv") if c["metric"] == "accuracy")
    assert accuracy["n_pairs"] == "3" and NOTE in accuracy["note"]


def test_the_first_run_by_path_is_kept_whatever_the_order_and_figures_count_it_once(tmp_path):
    from cdft_core.reports.collect import collect
    from cdft_core.reports.plots import learning_series
    from cdft_core.reports.rows import build_rows, one_per_split

    summary = _tree(tmp_path / "runs")
    runs = [r for r in collect([str(tmp_path / "runs")]).runs if r.strategy == "frt"]
    for order in (runs, runs[::-1]):
        (row,) = build_rows(order, "test")
        assert (row.n, row.duplicates, len(row.samples)) == (3, 2, 5)
        assert all("cvF" in s.run.path for s in row.kept)
        assert sorted(row.values("accuracy")) == sorted(
            json.loads((tmp_path / "runs" / "cvF" / f"rotation-{r}" / "summary.json").read_text())["test"]["accuracy"]
            for r in range(3))
        kept, dropped = one_per_split(row.samples, "accuracy")
        assert [s.run.path for s in kept] == [s.run.path for s in row.kept] and dropped == 2
        curves = learning_series(row)
        assert all(len(values) == 3 for metrics in curves.values() for per_epoch in metrics.values()
                   for values in per_epoch.values())
    assert summary["metrics"]["test/accuracy"]["n"] == 3


def test_the_same_folds_of_two_split_files_are_neither_duplicates_nor_pairs(tmp_path):
    """Two runs with the same folds and seed but split files of other rows (another seed of
    `cdft prepare`): both count; each run's own split.csv says which rows it trained on."""
    runs = tmp_path / "runs"
    for name, rows in (("a", "image_path,label,fold\nx.png,0,0\ny.png,1,1\n"),
                       ("b", "image_path,label,fold\nx.png,0,1\ny.png,1,0\n")):
        fake_run(runs / name, strategy="frt", skill=1.0 if name == "a" else 3.0)
        (runs / name / "split.csv").write_text(rows)
    out = tmp_path / "report"
    code, _, stderr = invoke("report", str(runs), "-o", str(out))
    assert code == 0, stderr
    (row,) = read_csv(out / "results.csv")
    assert (row["runs"], row["duplicates"]) == ("2", "0")
    (runs / "b" / "split.csv").write_text((runs / "a" / "split.csv").read_text())  # the same rows: a duplicate
    code, _, stderr = invoke("report", str(runs), "-o", str(out))
    assert code == 0, stderr
    (row,) = read_csv(out / "results.csv")
    assert (row["runs"], row["duplicates"]) == ("1", "1")
