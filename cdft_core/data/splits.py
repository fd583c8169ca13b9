"""The two entry points the rest of cdft uses: :func:`prepare` and :func:`load_splits`.

- :func:`prepare` scans a data root and assigns folds: the table ``cdft prepare`` writes
  (``image_path,label,fold`` first, the paper's CSV contract, then the columns the dataset
  knows, such as ``class_name``, ``patient``, ``magnification``);
- :func:`load_splits` reads such a table (or scans and splits in memory), validates it
  and cuts it into train/val/test with the dataset's fold protocol: the :class:`Splits`
  a run trains on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cdft_core.data.options import build_dataset, choose_protocol, declared_options, option_key
from cdft_core.data.protocol import Dataset
from cdft_core.data.report import leaking_groups, summarise
from cdft_core.data.tables import (
    DECODE_CHECK,
    check_table,
    order_columns,
    read_split_file,
    record_options,
    recorded_options,
)
from cdft_core.errors import CdftError, UsageError

if TYPE_CHECKING:
    import pandas as pd

    from cdft_core.data.root import DataRoot
    from cdft_core.registry import Registry


@dataclass
class Splits:
    """The three tables of a run, with the class names (index == label) and the data root."""

    classes: list[str]
    root: str
    protocol: str
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    dataset: str = ""
    options: dict[str, str] = field(default_factory=dict)
    split_file: str | None = None
    group_column: str | None = None  # the dataset's (``patient``), None: images are independent

    def groups(self, split: str) -> list[str] | None:
        """The group (patient) of each row of ``split`` as text, ``""`` where a row has none;
        None when the table has no group column or no row has a value: the patient-level
        metrics and ``predictions.csv`` take their groups from here."""
        table = getattr(self, split)
        if not self.group_column or self.group_column not in table.columns:
            return None
        values = [group_text(v) for v in table[self.group_column].tolist()]
        return values if any(values) else None


def group_text(value: Any) -> str:
    """A group id as text: ``""`` for a missing value, ``22549`` (not ``22549.0``) for a
    number pandas read as float because some row was empty."""
    import pandas as pd

    if pd.isna(value):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _scan_and_fold(
    ds: Dataset, root: DataRoot, folds: int | None, seed: int, decode_check: int | None
) -> tuple[pd.DataFrame, list[str], int]:
    """Scan, sort by path, validate, assign folds: (table, classes, number of folds)."""
    table = ds.scan(root)
    if table is None or len(table) == 0:
        raise CdftError(
            f"no images of dataset {ds.name!r} found under data root {root.url}; check the path and the options"
        )
    table = table.drop(columns=["fold"], errors="ignore")
    classes = ds.class_names(table)
    table = check_table(table, classes, root, source="", require_fold=False, decode_check=decode_check)
    table = table.sort_values("image_path", kind="mergesort").reset_index(drop=True)
    n_folds = int(folds if folds is not None else ds.default_folds)
    table.insert(2, "fold", [int(f) for f in ds.assign_folds(table, n_folds, seed)])
    if "class_name" not in table.columns:
        table["class_name"] = [classes[label] for label in table["label"]]
    return order_columns(table, ds.group_column), list(classes), n_folds


def prepare_with_summary(
    dataset: str,
    root: str,
    *,
    options: Mapping[str, Any] | None = None,
    folds: int | None = None,
    seed: int = 1,
    registry: Registry | None = None,
    decode_check: int | None = DECODE_CHECK,
    duplicates: bool = True,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """:func:`prepare`, plus the report ``cdft prepare`` prints (see :func:`~cdft_core.data.report.summarise`).

    ``duplicates``: look for byte-identical images (reads only files of equal size).
    """
    from cdft_core.data.images import find_duplicates
    from cdft_core.data.root import DataRoot

    ds, resolved = build_dataset(dataset, options, registry)
    data_root = DataRoot.open(root)
    table, classes, n_folds = _scan_and_fold(ds, data_root, folds, seed, decode_check)
    dup_groups = find_duplicates(data_root, table["image_path"].tolist()) if duplicates else []
    summary = summarise(
        table,
        classes,
        group_column=ds.group_column,
        duplicates=dup_groups,
        groups_span_classes=bool(getattr(ds, "groups_span_classes", False)),
    )
    table = record_options(table, dataset, resolved)
    summary.update(
        {
            "dataset": dataset,
            "root": str(root),
            "options": resolved,
            "n_folds": n_folds,
            "seed": seed,
            "default_protocol": ds.default_protocol,
            "class_names": classes,
        }
    )
    return table, summary


def prepare(
    dataset: str,
    root: str,
    *,
    options: Mapping[str, Any] | None = None,
    folds: int | None = None,
    seed: int = 1,
    registry: Registry | None = None,
    decode_check: int | None = DECODE_CHECK,
) -> pd.DataFrame:
    """Scan ``root``, validate it and assign folds: the table ``cdft prepare`` writes.

    ``folds`` defaults to the dataset's ``default_folds``; the rows are sorted by path
    before folds are assigned, so the same data, options and seed give the same table.
    Its last columns record the dataset and options (:func:`~cdft_core.data.tables.record_options`),
    which :func:`load_splits` checks a run's options against.
    """
    table, _ = prepare_with_summary(
        dataset,
        root,
        options=options,
        folds=folds,
        seed=seed,
        registry=registry,
        decode_check=decode_check,
        duplicates=False,
    )
    return table


def load_splits(
    dataset: str,
    root: str,
    *,
    split_file: str | None,
    val_fold: int,
    test_fold: int,
    protocol: str | None = None,
    options: Mapping[str, Any] | None = None,
    folds: int | None = None,
    seed: int = 1,
    registry: Registry | None = None,
    decode_check: int | None = DECODE_CHECK,
) -> Splits:
    """The train/val/test tables of a run, validated before any training work.

    With ``split_file`` its folds are used as written (``folds``/``seed`` are ignored)
    and the options it records must agree with the run's (:func:`agree_with_split_file`):
    ``Splits.options`` are then what the rows really are. Without it the root is scanned
    and split in memory exactly as :func:`prepare` would.
    """
    from cdft_core.data.root import DataRoot

    ds, resolved = build_dataset(dataset, options, registry)
    chosen = choose_protocol(ds, protocol)
    data_root = DataRoot.open(root)
    if split_file is not None:
        written = read_split_file(split_file)
        raw, agreed = agree_with_split_file(written, str(split_file), dataset, options or {}, resolved, registry)
        if agreed != resolved:
            try:
                ds, resolved = build_dataset(dataset, agreed, registry)
            except UsageError as exc:
                raise UsageError(f"split file {split_file} records options this dataset refuses: {exc}") from exc
        classes = ds.class_names(raw)
        table = check_table(
            raw, classes, data_root, source=str(split_file), require_fold=True, decode_check=decode_check
        )
        refuse_patient_leakage(table, recorded_options(written, str(split_file))[2], ds.group_column, str(split_file))
    else:
        table, classes, _ = _scan_and_fold(ds, data_root, folds, seed, decode_check)
    train, val, test = ds.build_splits(table, val_fold=int(val_fold), test_fold=int(test_fold), protocol=chosen)
    return Splits(
        classes=list(classes),
        root=str(root),
        protocol=chosen,
        train=train,
        val=val,
        test=test,
        dataset=dataset,
        options=resolved,
        split_file=None if split_file is None else str(split_file),
        group_column=ds.group_column,
    )


def refuse_patient_leakage(
    table: pd.DataFrame, recorded: Mapping[str, str], group_column: str | None, source: str
) -> None:
    """A split file that records ``split=patient`` must keep every patient in one fold.

    Why: a hand-edited file (a row moved to another fold) would otherwise train silently
    with validation and test sharing patients with training, while its record, the saved
    config and the report all say the split is patient-level. Only a recorded patient
    split is checked: an image-level split (and a file without a record, the paper's)
    legitimately puts a patient's images in several folds.
    """
    if recorded.get("split") != "patient" or not group_column or group_column not in table.columns:
        return
    leaking = leaking_groups(table[table[group_column].notna()], group_column)
    if leaking:
        first, who = leaking[0], "patients are" if len(leaking) > 1 else "patient is"
        folds = [str(f) for f in first["folds"]]
        raise UsageError(
            f"split file {source} records --split patient but {len(leaking)} {who} in several folds "
            f"(e.g. {first['group']} in folds {', '.join(folds[:-1])} and {folds[-1]}): validation and test would "
            f"share patients with training; re-create it with `cdft prepare`"
        )


def agree_with_split_file(
    raw: pd.DataFrame,
    source: str,
    dataset: str,
    given: Mapping[str, Any],
    resolved: Mapping[str, str],
    registry: Registry | None = None,
) -> tuple[pd.DataFrame, dict[str, str]]:
    """The split file's rows and the options that describe them, or one usage error.

    ``given`` are the options the user named, ``resolved`` those plus the defaults. For
    each option that shapes the split (:class:`~cdft_core.data.protocol.DatasetOption`
    ``shapes_split``) and that the file records: the user silent, the file's value is
    used; the same value, fine; a file made with ``all`` of an option with a
    ``filter_column``, its rows are narrowed to the run's value; any other difference
    (an option the file was made without included) is refused, so a saved config never
    names options the data do not reflect. A file without a record (the paper's, or an
    older one) is accepted with the run's options.
    """
    from cdft_core.registry import get_registry

    table, made_for, recorded = recorded_options(raw, source)
    if made_for is None:
        return table, dict(resolved)
    if made_for != dataset:
        raise UsageError(
            f"split file {source} was made for dataset {made_for!r}, not {dataset!r}; "
            f"run with --dataset {made_for}, or make a split file with `cdft prepare {dataset}`"
        )
    declared = declared_options((registry or get_registry()).get("dataset", dataset))
    named = {option_key(k) for k in given}
    agreed = dict(resolved)
    for key, spec in declared.items():
        if not spec.get("shapes_split", True):
            continue
        if key not in recorded:  # made without it (no default): a run may not add it
            if key in named:
                raise UsageError(
                    f"split file {source} was made without option {key}, but this run asks for {key}={resolved[key]}; "
                    f"drop --dataset-option {key}, or rerun `cdft prepare {dataset} ROOT --{key.replace('_', '-')} "
                    f"{resolved[key]}` for a split file with it"
                )
            continue
        ours, theirs = resolved.get(key), recorded[key]
        if key not in named:
            agreed[key] = theirs  # checked against the declared choices when the dataset is rebuilt
        elif ours != theirs:
            table = _narrowed(table, source, dataset, key, spec, theirs, str(ours))
    return table, agreed


def _narrowed(
    table: pd.DataFrame, source: str, dataset: str, key: str, spec: Mapping[str, Any], theirs: str, ours: str
) -> pd.DataFrame:
    """The rows of a file made with ``key=all`` that have ``key=ours``; else the one-line refusal."""
    column = spec.get("filter_column")
    if column and theirs == spec.get("match_all") and column in table.columns:
        kept = table[table[column].astype(str) == ours]
        if len(kept) == 0:
            raise UsageError(
                f"split file {source} (made with {key}={theirs}) has no rows with {column} {ours}; "
                f"check --dataset-option {key}={ours}"
            )
        return kept.reset_index(drop=True)
    raise UsageError(
        f"split file {source} was made with {key}={theirs}, but this run asks for {key}={ours}; "
        f"pass --dataset-option {key}={theirs}, or rerun `cdft prepare {dataset} ROOT --{key.replace('_', '-')} {ours}` "
        f"for a split file with {key}={ours}"
    )
