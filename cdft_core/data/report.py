"""The report ``cdft prepare`` prints: images, patients and classes per fold, leakage,
duplicates, and the warnings drawn from them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


def summarise(
    table: pd.DataFrame,
    classes: Sequence[str],
    *,
    group_column: str | None,
    duplicates: Sequence[Sequence[str]] = (),
    groups_span_classes: bool = False,
) -> dict[str, Any]:
    """Counts per class and per fold, leakage, cross-class groups and duplicate images.

    ``groups_span_classes``: the dataset declares that a group (a patient) may hold
    several classes; the cross-class groups are still listed, but not warned about.

    ``folds_missing_classes`` lists, per fold, the classes (with images elsewhere) that
    have no image in it: ``[{"fold": 2, "classes": ["y"]}, ...]``, folds in order.

    ``duplicates`` lists groups of byte-identical files (paths as in the table).
    The result is JSON-ready (``cdft prepare --json`` prints it as is).
    """
    folds = sorted(int(f) for f in table["fold"].unique())
    has_groups = group_column is not None and group_column in table.columns
    groups = table[group_column].astype(str) if has_groups else None

    def n_groups(mask: Any) -> int | None:
        return int(groups[mask].nunique()) if groups is not None else None

    class_rows = []
    for label, name in enumerate(classes):
        in_class = table["label"] == label
        class_rows.append(
            {
                "label": label,
                "name": name,
                "images": int(in_class.sum()),
                "groups": n_groups(in_class),
                "per_fold": {str(f): int((in_class & (table["fold"] == f)).sum()) for f in folds},
            }
        )
    fold_rows = []
    for f in folds:
        in_fold = table["fold"] == f
        fold_rows.append({"fold": f, "images": int(in_fold.sum()), "groups": n_groups(in_fold)})

    leaking = leaking_groups(table, group_column) if has_groups else []
    cross_class: list[dict[str, Any]] = []
    if groups is not None:
        for name, rows in table.groupby(groups, sort=True):
            labels = sorted(int(v) for v in rows["label"].unique())
            if len(labels) > 1:
                cross_class.append({"group": str(name), "classes": [classes[v] for v in labels]})

    fold_of = dict(zip(table["image_path"], table["fold"], strict=True))
    duplicate_rows = []
    for paths in duplicates:
        dup_folds = sorted({int(fold_of[p]) for p in paths if p in fold_of})
        duplicate_rows.append({"paths": list(paths), "folds": dup_folds})

    sparse = [row["name"] for row in class_rows if 0 < row["images"] < len(folds)]
    # a fold without a class: validated or tested on that fold, the class has no image, so
    # the fold's metrics leave it out of their macro averages (docs/method.md#metrics);
    # classes with no image at all are reported as empty instead
    missing = []
    for f in folds:
        lacking = [row["name"] for row in class_rows if row["images"] > 0 and row["per_fold"][str(f)] == 0]
        if lacking:
            missing.append({"fold": f, "classes": lacking})
    repeated = table["image_path"][table["image_path"].duplicated()].unique().tolist()
    return {
        "images": int(len(table)),
        "groups": n_groups(slice(None)),
        "group_column": group_column if has_groups else None,
        "folds": fold_rows,
        "classes": class_rows,
        "leakage": leaking,
        "cross_class_groups": cross_class,
        "groups_span_classes": bool(groups_span_classes),
        "duplicates": duplicate_rows,
        "duplicates_across_folds": sum(1 for d in duplicate_rows if len(d["folds"]) > 1),
        "sparse_classes": sparse,
        "empty_classes": [row["name"] for row in class_rows if row["images"] == 0],
        "folds_missing_classes": missing,
        "repeated_rows": repeated,
    }


def leaking_groups(table: pd.DataFrame, group_column: str) -> list[dict[str, Any]]:
    """The groups (patients) found in more than one fold: ``[{"group": "13412", "folds": [0, 2]}, ...]``,
    by group name. One function for the prepare report and for the check a run makes of a
    split file that records a patient-level split (:func:`~cdft_core.data.splits.load_splits`)."""
    groups = table[group_column].astype(str)
    leaking: list[dict[str, Any]] = []
    for name, rows in table.groupby(groups, sort=True):
        fold_set = sorted(int(f) for f in rows["fold"].unique())
        if len(fold_set) > 1:
            leaking.append({"group": str(name), "folds": fold_set})
    return leaking


def _capped(items: Sequence[str], max_listed: int) -> str:
    """``a, b, c; 4 more in --json``: the first ``max_listed`` items and how many are left."""
    more = f"; {len(items) - max_listed} more in --json" if len(items) > max_listed else ""
    return ", ".join(items[:max_listed]) + more


def warnings_of(summary: Mapping[str, Any], max_listed: int = 3) -> list[str]:
    """The warning lines of a summary, one line per kind of problem (shown on stderr and in JSON).

    A kind with many cases (patients in several classes, empty classes, ...) gives one
    line with the count and ``max_listed`` examples: a dataset with 300 such patients
    must not bury the report. Every case is in the summary itself (``--json``).
    """
    who = summary.get("group_column") or "group"
    out = []
    crossed = [] if summary.get("groups_span_classes") else summary["cross_class_groups"]
    if len(crossed) == 1:
        row = crossed[0]
        out.append(f"{who} {row['group']} is filed under more than one class: {', '.join(row['classes'])}")
    elif crossed:
        examples = [f"{row['group']} ({', '.join(row['classes'])})" for row in crossed]
        out.append(
            f"{len(crossed)} {who}s are filed under more than one class, e.g. {_capped(examples, max_listed)}"
        )
    duplicates = summary["duplicates"]
    if duplicates:
        across = summary["duplicates_across_folds"]
        leak = f", {across} of them across folds (leakage)" if across else ", each within one fold"
        # one example: BreakHis paths are ~120 characters, so three sets made a 700-character line
        more = f"; {len(duplicates) - 1} more in --json" if len(duplicates) > 1 else ""
        out.append(f"{len(duplicates)} set(s) of byte-identical images{leak}, e.g. {' = '.join(duplicates[0]['paths'])}{more}")
    repeated = summary.get("repeated_rows") or []
    if repeated:
        out.append(f"{len(repeated)} image path(s) listed more than once: {_capped(repeated, max_listed)}")
    empty = summary["empty_classes"]
    if len(empty) == 1:
        out.append(f"class {empty[0]} has no images")
    elif empty:
        out.append(f"{len(empty)} classes have no images: {_capped(empty, max_listed)}")
    sparse = summary["sparse_classes"]
    if len(sparse) == 1:
        out.append(f"class {sparse[0]} has fewer images than folds; some folds have none of it")
    elif sparse:
        out.append(
            f"{len(sparse)} classes have fewer images than folds (some folds have none of them): "
            f"{_capped(sparse, max_listed)}"
        )
    missing = summary.get("folds_missing_classes") or []
    if missing:
        pairs = sum(len(row["classes"]) for row in missing)

        def lacks(row: Mapping[str, Any]) -> str:
            names = row["classes"]
            more = f" +{len(names) - max_listed} more" if len(names) > max_listed else ""
            return f"fold {row['fold']} lacks {', '.join(names[:max_listed])}{more}"

        shown = "; ".join(lacks(row) for row in missing[:max_listed])
        more = f"; {len(missing) - max_listed} more fold(s) in --json" if len(missing) > max_listed else ""
        out.append(
            f"{len(missing)} of {len(summary['folds'])} fold(s) lack a class, {pairs} fold/class pair(s) "
            f"(no image to validate or test it on there): {shown}{more}"
        )
    return out
