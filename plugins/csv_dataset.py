"""The generic ``csv`` dataset: bring your own images and one CSV, no plugin to write.

The CSV has ``image_path`` (relative to the data root) and ``label`` (0, 1, ...), and
optionally ``group`` (rows of one group, e.g. one patient, always share a fold),
``class_name`` (the name of each label) and any other columns (kept as they are).

- ``cdft prepare csv ROOT --table labels.csv -o split.csv`` reads the CSV (``--table``:
  relative to the root, or an absolute path/URL; default ``labels.csv``) and assigns
  new stratified folds, grouped by ``group`` when present; an existing ``fold`` column is
  replaced.
- To keep your own folds, pass the CSV (with ``fold``) as the split file of a run:
  paper-format files (``image_path,label,fold``) are read unchanged.

Class names: the ``--classes a,b,c`` option (label order; it replaces the CSV's
``class_name`` column), else the ``class_name`` column, else the label numbers.

``--groups-span-classes yes``: a group may hold images of several classes (tissue tiles,
one patient giving several tissue types); the report then does not warn about it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cdft_core import BaseDataset, DatasetOption, UsageError, dataset_metadata, hookimpl, read_split_file, split_names

if TYPE_CHECKING:
    import pandas as pd

    from cdft_core import DataRoot

OPTIONS = (
    DatasetOption(
        "table",
        "the CSV (image_path,label[,group][,class_name]): relative to the root, or a path/URL",
        default="labels.csv",
    ),
    DatasetOption("classes", "class names in label order, comma-separated (default: the class_name column)"),
    DatasetOption(
        "groups_span_classes",
        "yes: a group may hold several classes (one patient's tiles of several tissues), so the report does not warn",
        default="no",
        choices=("no", "yes"),
        shapes_split=False,  # it changes the report only, never the rows
    ),
)


class CsvDataset(BaseDataset):
    """Images listed by a CSV (see the module docstring)."""

    name = "csv"
    default_folds = 5
    group_column = "group"

    def __init__(self, table: str = "labels.csv", classes: str | None = None, groups_span_classes: str = "no") -> None:
        self.table = table
        self.groups_span_classes = groups_span_classes == "yes"
        # no --classes: BaseDataset reads the names from the class_name column or the labels
        self.classes = tuple(split_names(classes) or ())

    def scan(self, root: DataRoot) -> pd.DataFrame:
        what = f"--table {self.table!r}"
        advice = "write that CSV (image_path,label[,group][,class_name]) or name yours with --table"
        if "://" in self.table or self.table.startswith("/"):
            table = read_split_file(self.table, what="--table file", missing=advice)
        else:
            table = read_split_file(root.path(self.table), fs=root.fs, what="--table file", missing=advice)
        missing = [c for c in ("image_path", "label") if c not in table.columns]
        if missing:
            raise UsageError(
                f"{what} has no column {', '.join(missing)} (columns: {', '.join(map(str, table.columns))}); "
                f"it needs image_path,label and optionally group, class_name"
            )
        # new folds are assigned; names given by --classes replace the CSV's class_name
        return table.drop(columns=["fold", *(["class_name"] if self.classes else [])], errors="ignore")


def make_csv(**options: str) -> CsvDataset:
    return CsvDataset(**options)


@hookimpl
def register_datasets(register):
    register(
        "csv",
        make_csv,
        description="Your images listed by a CSV (image_path,label[,group][,class_name])",
        metadata=dataset_metadata(
            CsvDataset,
            classes="from --classes, else the CSV's class_name column, else the label numbers",
            options=OPTIONS,
        ),
    )
