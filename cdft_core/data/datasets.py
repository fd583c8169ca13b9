"""Datasets: the protocol a dataset plugin implements, split tables, and their validation.

A dataset plugin registers a factory, ``factory(**options) -> Dataset``, together with
metadata built by :func:`dataset_metadata` (what ``cdft list datasets --json`` shows and
what option values are checked against before the factory runs)::

    from cdft_core import hookimpl

    @hookimpl
    def register_datasets(register):
        register("tiles", make_tiles, description="...", metadata=dataset_metadata(...))

The object the factory returns satisfies :class:`Dataset`; :class:`BaseDataset` gives the
usual behaviour so a plugin usually writes only ``scan`` (see docs/datasets.md).

Two entry points serve the rest of cdft:

- :func:`prepare` scans a data root and assigns folds: the table ``cdft prepare`` writes
  (``image_path,label,fold`` first, the paper's CSV contract, then the columns the dataset
  knows, such as ``class_name``, ``patient``, ``magnification``);
- :func:`load_splits` reads such a table (or scans and splits in memory), validates it
  and cuts it into train/val/test with the dataset's fold protocol.

Errors, one line each and raised before any training work:

- :class:`UsageError` (exit 2) when the *arguments or the split file* are wrong: unknown
  dataset, option or choice; data root or split file that does not exist; a CSV without
  a required column or with a non-integer label/fold; a label outside the classes; a
  fold that does not exist or leaves a split empty; an image path that escapes the root.
- :class:`CdftError` (exit 1) when the *data on disk* is not what the table says: a root
  with no images, an image that is missing, unreadable or does not decode.

pandas is imported inside the functions: plugin modules import this module at load time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from cdft_core.data.folds import (
    PROTOCOLS,
    FoldProtocol,
    split_table,
    stratified_folds,
    stratified_group_folds,
    summarise,
)
from cdft_core.errors import CdftError, UsageError

if TYPE_CHECKING:
    import pandas as pd

    from cdft_core.data.images import DataRoot
    from cdft_core.registry import Component, Registry

#: Columns of the paper's split CSV, in order; cdft writes them first and reads them as is.
SPLIT_COLUMNS: tuple[str, ...] = ("image_path", "label", "fold")
#: How many images :func:`load_splits` and :func:`prepare` decode as a check by default.
DECODE_CHECK = 8


# -- what a dataset declares ------------------------------------------------------------


@dataclass(frozen=True)
class DatasetOption:
    """One dataset option (``cdft prepare NAME ROOT --NAME VALUE``): values are strings.

    ``choices`` (if given) are matched case-insensitively and passed to the factory in
    their declared spelling; ``default`` is what the factory receives when the user is
    silent (``None``: the factory receives nothing for it).
    """

    name: str
    help: str
    default: str | None = None
    choices: tuple[str, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"choices": list(self.choices) if self.choices else None, "default": self.default, "help": self.help}


def dataset_metadata(
    *,
    classes: Sequence[str] | Mapping[str, Sequence[str]] | str,
    options: Sequence[DatasetOption] = (),
    default_protocol: str = "standard",
    default_folds: int = 5,
    protocols: Mapping[str, FoldProtocol] = PROTOCOLS,
    group_column: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The registration metadata of a dataset, in the shape cdft reads back.

    ``classes``: the class names in label order, or ``{task: [...]}`` when an option picks
    the task, or a sentence when the data decides (the generic ``csv`` dataset).
    """
    if default_protocol not in protocols:
        raise ValueError(f"default_protocol {default_protocol!r} is not one of {sorted(protocols)}")
    classes_json: Any = (
        classes
        if isinstance(classes, str)
        else ({k: list(v) for k, v in classes.items()} if isinstance(classes, Mapping) else list(classes))
    )
    return {
        "classes": classes_json,
        "default_protocol": default_protocol,
        "protocols": {name: p.description for name, p in protocols.items()},
        "default_folds": int(default_folds),
        "group_column": group_column,
        "options": {o.name: o.to_json() for o in options},
        **extra,
    }


@runtime_checkable
class Dataset(Protocol):
    """What a dataset factory returns. cdft calls these, in this order:

    ``scan(root)``
        List the images under a :class:`~cdft_core.data.images.DataRoot` and return a
        ``pandas.DataFrame`` with ``image_path`` (relative to the root, ``/``-separated),
        ``label`` (int, index into the classes) and any extra columns worth keeping
        (e.g. ``patient``). Rows of other classes or options (a magnification filter) are
        left out here. No images: raise :class:`CdftError` saying what was looked for.
    ``class_names(table)``
        The class names, index == label. Most datasets ignore ``table``; the generic
        ``csv`` dataset reads the names from it. ``table`` is ``None`` for listings.
    ``assign_folds(table, folds, seed)``
        One fold number (``0..folds-1``) per row; rows arrive sorted by ``image_path``.
        Rows sharing a value of ``group_column`` (a patient) should share a fold; the
        report of ``cdft prepare`` lists every group found in several folds as leakage.
    ``build_splits(table, val_fold=, test_fold=, protocol=)``
        ``(train, val, test)`` tables cut from a table with a ``fold`` column, by the
        named entry of ``protocols``.

    The factory receives the dataset's options as strings, already checked against the
    :class:`DatasetOption` list of its registration metadata (names, choices, defaults):
    options are declared there, not on the object, so ``cdft list`` can show them and
    bad values fail before anything is built.

    Attributes: ``name``; ``default_protocol`` (used when the user names none);
    ``protocols`` (name -> :class:`~cdft_core.data.folds.FoldProtocol`); ``default_folds``;
    ``group_column``: the column naming where an image comes from (a patient), or
    ``None`` when images are independent.
    """

    name: str
    default_protocol: str
    default_folds: int
    group_column: str | None
    protocols: Mapping[str, FoldProtocol]

    def scan(self, root: DataRoot) -> pd.DataFrame: ...

    def class_names(self, table: pd.DataFrame | None = None) -> list[str]: ...

    def assign_folds(self, table: pd.DataFrame, folds: int, seed: int) -> list[int]: ...

    def build_splits(
        self, table: pd.DataFrame, *, val_fold: int, test_fold: int, protocol: str
    ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]: ...


class BaseDataset:
    """The usual :class:`Dataset` behaviour; subclasses set ``classes`` and write ``scan``.

    Classes: ``classes`` when set. A dataset whose data names its classes (the generic
    ones) leaves ``classes`` empty; its names then come from the table's ``class_name``
    column, else :meth:`classes_from_data`.

    Folds: stratified by label, grouped by ``group_column`` when the table has it
    (:func:`~cdft_core.data.folds.stratified_group_folds`), else the paper's image-level
    ``StratifiedKFold`` (:func:`~cdft_core.data.folds.stratified_folds`). Splits: the named
    :class:`~cdft_core.data.folds.FoldProtocol` of ``protocols``.
    """

    name: str = "dataset"
    classes: Sequence[str] = ()
    default_protocol: str = "standard"
    default_folds: int = 5
    group_column: str | None = None
    protocols: Mapping[str, FoldProtocol] = PROTOCOLS

    def class_names(self, table: pd.DataFrame | None = None) -> list[str]:
        if self.classes or table is None:
            return list(self.classes)
        return class_names_from_table(table) or self.classes_from_data(table)

    def classes_from_data(self, table: pd.DataFrame) -> list[str]:
        """Names for a table without ``classes`` or a ``class_name`` column: the label numbers."""
        import pandas as pd

        labels = pd.to_numeric(table["label"], errors="coerce").dropna() if "label" in table.columns else []
        return [str(i) for i in range(int(max(labels)) + 1)] if len(labels) else []

    def assign_folds(self, table: pd.DataFrame, folds: int, seed: int) -> list[int]:
        labels = table["label"].astype(int).tolist()
        if self.group_column and self.group_column in table.columns:
            return stratified_group_folds(labels, table[self.group_column].astype(str).tolist(), folds, seed)
        return stratified_folds(labels, folds, seed)

    def build_splits(
        self, table: pd.DataFrame, *, val_fold: int, test_fold: int, protocol: str
    ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        return split_table(table, self.protocols[protocol], val_fold, test_fold)


def class_names_from_table(table: pd.DataFrame, column: str = "class_name") -> list[str] | None:
    """Class names read from a table's ``column`` (label -> name), or ``None`` without it.

    A label with two different names is a usage error; labels never seen in between get
    their number as name. Rows whose label is not an integer are left to the table check.
    """
    import pandas as pd

    if column not in table.columns or table.empty:
        return None
    names: dict[int, str] = {}
    labels = pd.to_numeric(table["label"], errors="coerce")
    for label, name in zip(labels.tolist(), table[column].astype(str).tolist(), strict=True):
        if pd.isna(label) or float(label) != int(label) or int(label) < 0:
            continue
        old = names.setdefault(int(label), name)
        if old != name:
            raise UsageError(
                f"label {int(label)} has two class names, {old!r} and {name!r}; give each label one {column}"
            )
    if not names:
        return None
    return [names.get(i, str(i)) for i in range(max(names) + 1)]


def split_names(text: str | None) -> list[str] | None:
    """``"a,b , c"`` -> ``["a", "b", "c"]`` (an option listing class names); ``None`` stays."""
    if text is None:
        return None
    names = [part.strip() for part in str(text).split(",") if part.strip()]
    if len(set(names)) != len(names):
        raise UsageError(f"class names {text!r} repeat a name; list each class once")
    return names or None


# -- what the engine receives -----------------------------------------------------------


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


# -- options and construction ---------------------------------------------------------------


def declared_options(component: Component) -> dict[str, dict[str, Any]]:
    """The options a registered dataset declares (name -> choices/default/help)."""
    return dict(component.metadata.get("options") or {})


def option_key(name: str) -> str:
    """``--normal-dir`` / ``normal-dir`` / ``normal_dir`` -> ``normal_dir``."""
    return str(name).lstrip("-").replace("-", "_")


def resolve_options(component: Component, options: Mapping[str, Any] | None) -> dict[str, str]:
    """Check user options against the dataset's declared ones and fill in the defaults."""
    declared = declared_options(component)
    # named without a flag spelling: `cdft prepare --task X` and `cdft run --dataset-option task=X` both land here
    valid = ", ".join(declared) or "none"
    out: dict[str, str] = {}
    for raw_key, raw_value in (options or {}).items():
        key = option_key(raw_key)
        if key not in declared:
            raise UsageError(f"dataset {component.name!r} has no option {key!r}; its options: {valid}")
        value = str(raw_value)
        choices = declared[key].get("choices")
        if choices:
            match = next((c for c in choices if c.lower() == value.lower()), None)
            if match is None:
                raise UsageError(
                    f"invalid value {value!r} for option {key!r} of dataset {component.name!r}; choose from: {', '.join(choices)}"
                )
            value = match
        out[key] = value
    for key, spec in declared.items():
        if key not in out and spec.get("default") is not None:
            out[key] = str(spec["default"])
    return {key: out[key] for key in declared if key in out}  # declared order: stable output


def build_dataset(
    name: str, options: Mapping[str, Any] | None = None, registry: Registry | None = None
) -> tuple[Dataset, dict[str, str]]:
    """Resolve ``name``, check its options and call its factory."""
    from cdft_core.registry import get_registry

    component = (registry or get_registry()).get("dataset", name)
    resolved = resolve_options(component, options)
    dataset = component.factory(**resolved)
    if not isinstance(dataset, Dataset):
        raise CdftError(
            f"dataset {name!r} (plugin {component.provider!r}) did not return a Dataset object; "
            f"see docs/datasets.md for the protocol"
        )
    return dataset, resolved


def _protocol(dataset: Dataset, protocol: str | None) -> str:
    chosen = protocol or dataset.default_protocol
    if chosen not in dataset.protocols:
        raise UsageError(
            f"unknown protocol {chosen!r} for dataset {dataset.name!r}; choose from: {', '.join(dataset.protocols)}"
        )
    return chosen


# -- reading, checking and writing split tables ---------------------------------------------


def read_split_file(
    split_file: str, *, fs: Any = None, what: str = "split file", missing: str = "make one with `cdft prepare`"
) -> pd.DataFrame:
    """Read a split CSV as it is (columns are checked later).

    ``split_file`` is a local path or fsspec URL, or a path inside ``fs`` when given
    (a CSV stored under a data root). ``what`` names it in error lines; ``missing`` is
    the advice when it does not exist.
    """
    import fsspec
    import pandas as pd

    try:
        opener = fs.open(split_file, "rb") if fs is not None else fsspec.open(str(split_file), "rb")
        with opener as handle:
            table = pd.read_csv(handle, dtype={"image_path": str}, keep_default_na=False, na_values=[""])
    except FileNotFoundError as exc:
        raise UsageError(f"{what} {split_file!r} does not exist; {missing}") from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UsageError(f"{what} {split_file!r} is not a readable CSV ({_first_line(exc)})") from exc
    except (OSError, ValueError, ImportError) as exc:
        raise CdftError(f"cannot read {what} {split_file!r}: {_first_line(exc)}") from exc
    return table


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _integers(table: pd.DataFrame, column: str, where: Any) -> list[int]:
    import pandas as pd

    values = pd.to_numeric(table[column], errors="coerce")
    for idx, (raw, num) in enumerate(zip(table[column].tolist(), values.tolist(), strict=True)):
        if pd.isna(num) or float(num) != int(num):
            raise UsageError(f"{where(idx)}: {column} {raw!r} is not an integer")
    return [int(v) for v in values.tolist()]


def check_table(
    table: pd.DataFrame,
    classes: Sequence[str],
    root: DataRoot,
    *,
    source: str,
    require_fold: bool,
    decode_check: int | None = DECODE_CHECK,
) -> pd.DataFrame:
    """Validate a split table against its data root; return it with clean paths and ints.

    ``source`` names the split file (its rows are reported as CSV line numbers) or is
    empty for a scanned table (rows are reported by file). ``decode_check`` images,
    spread evenly over the table, are decoded (``None``: all of them).
    """
    required = SPLIT_COLUMNS if require_fold else SPLIT_COLUMNS[:2]
    missing = [c for c in required if c not in table.columns]
    if missing:
        where = f"split file {source}" if source else "the scanned table"
        raise UsageError(
            f"{where} has no column {', '.join(missing)} (columns: {', '.join(map(str, table.columns)) or 'none'}); "
            f"a split file needs {','.join(required)}, e.g. from `cdft prepare`"
        )
    if table.empty:
        raise UsageError(f"split file {source} has no rows" if source else "the dataset has no images")
    table = table.reset_index(drop=True).copy()

    def where(idx: int) -> str:
        if source:
            return f"split file {source} line {idx + 2}"
        return f"image {table['image_path'].iloc[idx]!r}"

    def at(idx: int) -> str:
        """The prefix of a message that names the image itself: the CSV line, if any."""
        return f"{where(idx)}: " if source else ""

    table["image_path"] = [root.confine(p, where(i) if source else "") for i, p in enumerate(table["image_path"].tolist())]
    table["label"] = _integers(table, "label", where)
    if "fold" in table.columns:
        table["fold"] = _integers(table, "fold", where)
    n = len(classes)
    for idx, label in enumerate(table["label"].tolist()):
        if not 0 <= label < n:
            raise UsageError(
                f"{where(idx)}: label {label} is outside the {n} classes (0..{n - 1}: {', '.join(classes)}); "
                f"check the dataset options (e.g. --task) match the split file"
            )
    if "class_name" in table.columns:
        for idx, (label, name) in enumerate(
            zip(table["label"].tolist(), table["class_name"].astype(str).tolist(), strict=True)
        ):
            if name != classes[label]:
                raise UsageError(
                    f"{where(idx)}: class_name {name!r} does not match label {label} = {classes[label]!r}; "
                    f"use the dataset options the file was prepared with"
                )

    present = root.files(extensions=None)
    absent = [i for i, p in enumerate(table["image_path"].tolist()) if p not in present]
    if absent:
        more = f" (and {len(absent) - 1} more missing)" if len(absent) > 1 else ""
        raise CdftError(
            f"{at(absent[0])}image {table['image_path'].iloc[absent[0]]!r} not found under data root "
            f"{root.url}{more}; check the root or the split file"
        )
    _decode_sample(table, root, decode_check, at)
    return table


def _decode_sample(table: pd.DataFrame, root: DataRoot, count: int | None, at: Callable[[int], str]) -> None:
    from cdft_core.data.images import decode_image

    total = len(table)
    if count is None or count >= total:
        rows = list(range(total))
    else:
        rows = sorted({round(i * (total - 1) / max(count - 1, 1)) for i in range(max(count, 1))})
    for idx in rows:
        path = table["image_path"].iloc[idx]
        try:
            decode_image(root.read_bytes(path), path)
        except CdftError as exc:
            raise CdftError(f"{at(idx)}{exc}") from exc


def order_columns(table: pd.DataFrame, group_column: str | None) -> pd.DataFrame:
    """``image_path,label,fold`` first (the paper's contract), then the known columns."""
    first = [c for c in (*SPLIT_COLUMNS, "class_name", group_column) if c and c in table.columns]
    return table[first + [c for c in table.columns if c not in first]]


def write_split_file(table: pd.DataFrame, destination: str) -> None:
    """Write a split table atomically: a temporary file, then a rename.

    A failure leaves any previous file untouched and no partial file behind. Local
    files use ``os.replace``; other fsspec filesystems a temporary sibling and ``mv``.
    """
    from fsspec.core import url_to_fs
    from fsspec.implementations.local import LocalFileSystem

    data = table.to_csv(index=False, lineterminator="\n").encode("utf-8")
    try:
        fs, path = url_to_fs(str(destination))
    except (ImportError, ValueError) as exc:
        raise UsageError(f"cannot write split file {destination!r}: {exc}") from exc
    if isinstance(fs, LocalFileSystem):
        _write_local(data, path, destination)
        return
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        fs.pipe_file(temporary, data)
        fs.mv(temporary, path)
    except Exception as exc:
        try:
            if fs.exists(temporary):
                fs.rm(temporary)
        except Exception:  # cleanup is best effort; the original error is what matters
            pass
        raise CdftError(f"cannot write split file {destination!r}: {_first_line(exc)}") from exc


def _write_local(data: bytes, path: str, destination: str) -> None:
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"cannot write split file {destination!r}: folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"cannot write split file {destination!r}: it is a folder; name a .csv file")
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException as exc:
        if os.path.exists(temporary):
            os.unlink(temporary)
        if isinstance(exc, OSError):
            raise CdftError(f"cannot write split file {destination!r}: {exc}") from exc
        raise


# -- the two entry points -------------------------------------------------------------------


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
    """:func:`prepare`, plus the report ``cdft prepare`` prints (see :func:`~cdft_core.data.folds.summarise`).

    ``duplicates``: look for byte-identical images (reads only files of equal size).
    """
    from cdft_core.data.images import DataRoot, find_duplicates

    ds, resolved = build_dataset(dataset, options, registry)
    data_root = DataRoot.open(root)
    table, classes, n_folds = _scan_and_fold(ds, data_root, folds, seed, decode_check)
    dup_groups = find_duplicates(data_root, table["image_path"].tolist()) if duplicates else []
    summary = summarise(table, classes, group_column=ds.group_column, duplicates=dup_groups)
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

    With ``split_file`` its folds are used as written (``folds``/``seed`` are ignored);
    dataset options then only choose the classes (e.g. ``task``), not the rows. Without
    it the root is scanned and split in memory exactly as :func:`prepare` would.
    """
    from cdft_core.data.images import DataRoot

    ds, resolved = build_dataset(dataset, options, registry)
    chosen = _protocol(ds, protocol)
    data_root = DataRoot.open(root)
    if split_file is not None:
        raw = read_split_file(split_file)
        classes = ds.class_names(raw)
        table = check_table(
            raw, classes, data_root, source=str(split_file), require_fold=True, decode_check=decode_check
        )
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
    )
