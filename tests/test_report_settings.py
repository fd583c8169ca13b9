"""`cdft report` settings: the number of training processes is part of a row's setting (a
2-process run is never averaged with a 1-process one), and paired comparisons pair rows by
their configuration, not their labels, so an unrelated run never removes a valid comparison.

The runs are :func:`test_report.fake_run` trees: no training.
"""

from __future__ import annotations

import json
from pathlib import Path

from helpers_engine import invoke
from test_report import fake_run, read_csv


def _processes(path: Path, summary: int | None = None, environment: int | None = None) -> None:
    """Record the run's world size the way the engine does: in summary.json and/or environment.json."""
    if summary is not None:
        data = json.loads((path / "summary.json").read_text())
        (path / "summary.json").write_text(json.dumps({**data, "world_size": summary, "effective_batch": 8 * summary}))
    if environment is not None:
        (path / "environment.json").write_text(json.dumps({"python": "3.11", "world_size": environment}))


def _rows(runs: Path) -> list:
    from cdft_core.reports.collect import collect
    from cdft_core.reports.rows import build_rows

    return build_rows(collect([str(runs)]).runs, "test")


def _comparisons(runs: Path) -> dict[tuple[str, str, str, str], object]:
    from cdft_core.reports.compare import compare_rows

    return {(c.kind, c.within, c.a, c.b): c for c in compare_rows(_rows(runs), ["accuracy"])}


# -- processes -------------------------------------------------------------------------------
def test_a_two_process_run_is_never_averaged_with_a_one_process_run(tmp_path):
    runs = tmp_path / "runs"
    for name, world in (("single1", 1), ("ddp1", 2), ("single2", 1)):
        fake_run(runs / name, strategy="full", seed=1 if name != "single2" else 2)
        _processes(runs / name, summary=world)
    code, stdout, stderr = invoke("report", str(runs), "-o", str(tmp_path / "out"))
    assert code == 0, stderr
    rows = {r["setting"]: r["runs"] for r in read_csv(tmp_path / "out" / "results.csv")}
    assert rows == {"processes=1": "2", "processes=2": "1"}
    assert "processes=2" in stdout


def test_a_run_that_does_not_say_its_processes_is_a_setting_of_its_own(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs / "new", seed=1)
    _processes(runs / "new", summary=1)
    fake_run(runs / "older", seed=2)  # no world_size in its summary: environment.json says it
    _processes(runs / "older", environment=1)
    fake_run(runs / "oldest", seed=3)  # says it nowhere
    rows = {row.setting: row.n for row in _rows(runs)}
    assert rows == {"processes=1": 2, "processes=unknown": 1}


def test_runs_that_all_leave_the_processes_unsaid_stay_one_row(tmp_path):
    for seed in (1, 2):
        fake_run(tmp_path / "runs" / f"s{seed}", seed=seed)
    assert [(row.setting, row.n) for row in _rows(tmp_path / "runs")] == [("", 2)]


# -- pairing by configuration ----------------------------------------------------------------
def _grid(root: Path, cells: tuple[tuple[str, str], ...] = (("vit_b", "linear"), ("vit_b", "full"),
                                                               ("convnext", "linear"))) -> None:
    """A grid of two rotations per (backbone, strategy), all run the same way."""
    for backbone, strategy in cells:
        for test_fold in (0, 1):
            fake_run(root / f"{backbone}-{strategy}" / f"rotation-{test_fold}", backbone=backbone, strategy=strategy,
                     val_fold=1 - test_fold, test_fold=test_fold)


def test_an_unrelated_run_removes_no_paired_comparison(tmp_path):
    runs = tmp_path / "runs"
    _grid(runs / "grid")
    expected = {("strategy", "vit_b", "full", "linear"), ("backbone", "linear", "convnext", "vit_b")}
    before = _comparisons(runs)
    assert set(before) == expected and all(c.n == 2 and c.setting == "" for c in before.values())

    # a probe of vit_b · linear run otherwise (its own lr and epochs) on the splits of rotation 0
    fake_run(runs / "probe1", backbone="vit_b", strategy="linear", val_fold=1, test_fold=0,
             extra_config={"lr": 1e-3, "epochs": 3})
    labels = {(row.backbone, row.strategy, row.setting) for row in _rows(runs)}
    assert ("vit_b", "linear", "epochs=2, lr=0.0001") in labels and ("vit_b", "full", "") in labels
    after = _comparisons(runs)
    assert set(after) == expected  # the probe row pairs with nothing: its lr and epochs differ
    for key in expected:
        assert after[key].n == 2 and after[key].mean_diff == before[key].mean_diff
        assert after[key].setting == "epochs=2, lr=0.0001"  # which vit_b · linear row was compared


def test_rows_run_otherwise_do_not_pair_even_when_their_labels_agree(tmp_path):
    runs = tmp_path / "runs"
    _grid(runs, (("vit_b", "linear"),))
    for test_fold in (0, 1):
        fake_run(runs / f"convnext-{test_fold}", backbone="convnext", strategy="linear", val_fold=1 - test_fold,
                 test_fold=test_fold, extra_config={"lr": 1e-3})
    assert {row.setting for row in _rows(runs)} == {""}  # nothing varies within a row's runs
    assert _comparisons(runs) == {}


def test_a_strategy_brings_its_options_and_adapter_a_backbone_its_weights(tmp_path):
    """The paper's grid: staged (cdtm adapter, lr_factor 0.1) against linear (no adapter) is a
    strategy comparison; two backbones with their own weight files, a backbone comparison."""
    runs = tmp_path / "runs"
    for backbone, strategy, extra in (("vit_b", "linear", {"adapter": "none"}),
                                      ("vit_b", "staged", {"adapter": "cdtm", "strategy_options": {"lr_factor": 0.1}}),
                                      ("convnext", "staged", {"adapter": "cdtm", "strategy_options": {"lr_factor": 0.1},
                                                              "weights": "/w/convnext.safetensors"})):
        for test_fold in (0, 1):
            fake_run(runs / f"{backbone}-{strategy}-{test_fold}", backbone=backbone, strategy=strategy,
                     val_fold=1 - test_fold, test_fold=test_fold, extra_config=extra)
    assert set(_comparisons(runs)) == {("strategy", "vit_b", "linear", "staged"),
                                       ("backbone", "staged", "convnext", "vit_b")}
