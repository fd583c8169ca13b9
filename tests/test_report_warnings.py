"""The `cdft prepare` report warns when a fold lacks a class (validated or tested there, the
class would have no image), naming the folds and classes in one capped line, also in JSON."""

from __future__ import annotations

import json

import pandas as pd

from cdft_core.data.report import summarise, warnings_of


def _table(rows):
    return pd.DataFrame(
        [{"image_path": f"{i}.png", "label": label, "fold": fold} for i, (label, fold) in enumerate(rows)]
    )


def test_a_fold_without_a_class_is_warned_and_in_the_summary():
    # x in folds 0, 1, 2; y in folds 0, 1 only; z has no image at all (its own warning)
    table = _table([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 1)])
    summary = summarise(table, ["x", "y", "z"], group_column=None)
    assert summary["folds_missing_classes"] == [{"fold": 2, "classes": ["y"]}]
    assert summary["sparse_classes"] == []  # y has as many images as folds: only the new check sees it
    lines = warnings_of(summary)
    assert "class z has no images" in lines
    missing = [line for line in lines if "lack a class" in line]
    assert missing == ["1 of 3 fold(s) lack a class, 1 fold/class pair(s) (no image to validate or test it on there): "
                       "fold 2 lacks y"]
    assert json.loads(json.dumps(summary))["folds_missing_classes"] == [{"fold": 2, "classes": ["y"]}]


def test_every_fold_with_every_class_gives_no_warning():
    table = _table([(0, 0), (1, 0), (0, 1), (1, 1)])
    summary = summarise(table, ["x", "y"], group_column=None)
    assert summary["folds_missing_classes"] == []
    assert not any("lack a class" in line for line in warnings_of(summary))


def test_the_line_is_capped_like_the_others():
    # six classes, five folds; class 0 in every fold, the others only in fold 0
    rows = [(0, f) for f in range(5)] + [(c, 0) for c in range(1, 6)]
    summary = summarise(_table(rows), list("abcdef"), group_column=None)
    assert [row["fold"] for row in summary["folds_missing_classes"]] == [1, 2, 3, 4]
    assert summary["folds_missing_classes"][0]["classes"] == list("bcdef")
    (line,) = [line for line in warnings_of(summary) if "lack a class" in line]
    assert line.startswith("4 of 5 fold(s) lack a class, 20 fold/class pair(s)")
    assert line.endswith(
        "fold 1 lacks b, c, d +2 more; fold 2 lacks b, c, d +2 more; fold 3 lacks b, c, d +2 more; "
        "1 more fold(s) in --json"
    )
    (short,) = [line for line in warnings_of(summary, max_listed=5) if "lack a class" in line]
    assert short.endswith("fold 4 lacks b, c, d, e, f")
