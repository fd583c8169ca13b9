"""What a dataset plugin implements: the :class:`Dataset` protocol, :class:`BaseDataset`,
its options and its registration metadata.

A dataset plugin registers a factory, ``factory(**options) -> Dataset``, together with
metadata built by :func:`dataset_metadata` from the dataset class itself (what
``cdft list datasets --json`` shows and what option values are checked against before
the factory runs)::

    from cdft_core import BaseDataset, DatasetOption, dataset_metadata, hookimpl

    class Tiles(BaseDataset):
        name = "tiles"
        classes = ("stroma", "tumour")
        group_column = "patient"

        def scan(self, root): ...

    @hookimpl
    def register_datasets(register):
        register("tiles", Tiles, description="...", metadata=dataset_metadata(Tiles, options=OPTIONS))

pandas is imported inside the functions: plugin modules import this module at load time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from cdft_core.data.folds import PROTOCOLS, FoldProtocol, split_table, stratified_folds, stratified_group_folds
from cdft_core.errors import UsageError

if TYPE_CHECKING:
    import pandas as pd

    from cdft_core.data.root import DataRoot

#: Columns of the paper's split CSV, in order; cdft writes them first and reads them as is.
SPLIT_COLUMNS: tuple[str, ...] = ("image_path", "label", "fold")


# -- what a dataset declares ------------------------------------------------------------


@dataclass(frozen=True)
class DatasetOption:
    """One dataset option (``cdft prepare NAME ROOT --NAME VALUE``): values are strings.

    ``choices`` (if given) are matched case-insensitively and passed to the factory in
    their declared spelling; ``default`` is what the factory receives when the user is
    silent (``None``: the factory receives nothing for it).

    ``shapes_split`` (default ``True``): the option decides the split file's rows,
    labels or folds (a magnification filter, a task, a fold rule), so ``cdft prepare``
    records its value in the file and a run on that file must use the same value: the
    file's value when the user is silent, an error naming both when they differ. Set it
    to ``False`` only for options that change how images are read, never which.
    ``filter_column``: the table column holding each row's value of this option; with
    it, a split file made with ``match_all`` (e.g. ``--magnification all``) is narrowed
    to a run's single value by keeping the rows whose column equals it.
    """

    name: str
    help: str
    default: str | None = None
    choices: tuple[str, ...] | None = None
    shapes_split: bool = True
    filter_column: str | None = None
    match_all: str = "all"

    def to_json(self) -> dict[str, Any]:
        """The metadata entry; the split-file keys only when they differ from the defaults,
        so ``cdft show`` stays short (readers use ``.get`` with the same defaults)."""
        out: dict[str, Any] = {
            "choices": list(self.choices) if self.choices else None,
            "default": self.default,
            "help": self.help,
        }
        if not self.shapes_split:
            out["shapes_split"] = False
        if self.filter_column:
            out.update(filter_column=self.filter_column, match_all=self.match_all)
        return out


def dataset_metadata(
    dataset: type,
    *,
    classes: Sequence[str] | Mapping[str, Sequence[str]] | str | None = None,
    options: Sequence[DatasetOption] = (),
    **extra: Any,
) -> dict[str, Any]:
    """The registration metadata of a dataset class, in the shape cdft reads back.

    The folds, protocols and group column are read from the class (``default_folds``,
    ``default_protocol``, ``protocols``, ``group_column``): they are stated once, there.
    ``classes``: by default the class's ``classes``; pass ``{task: [...]}`` when an option
    picks the task, or a sentence when the data decides (the generic ``csv`` dataset).
    ``extra`` keys (e.g. ``layout``) are shown by ``cdft show dataset``.
    ``groups_span_classes`` is read from the class too (see :class:`BaseDataset`).
    """
    protocols: Mapping[str, FoldProtocol] = dataset.protocols
    if dataset.default_protocol not in protocols:
        raise ValueError(f"{dataset.__name__}.default_protocol {dataset.default_protocol!r} is not one of {sorted(protocols)}")
    if classes is None:
        classes = tuple(dataset.classes) or "from the data"
    classes_json: Any = (
        classes
        if isinstance(classes, str)
        else ({k: list(v) for k, v in classes.items()} if isinstance(classes, Mapping) else list(classes))
    )
    return {
        "classes": classes_json,
        "default_protocol": dataset.default_protocol,
        "protocols": {name: p.description for name, p in protocols.items()},
        "default_folds": int(dataset.default_folds),
        "group_column": dataset.group_column,
        "groups_span_classes": bool(getattr(dataset, "groups_span_classes", False)),
        "options": {o.name: o.to_json() for o in options},
        **extra,
    }


@runtime_checkable
class Dataset(Protocol):
    """What a dataset factory returns. cdft calls these, in this order:

    ``scan(root)``
        List the images under a :class:`~cdft_core.data.root.DataRoot` and return a
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
    ``None`` when images are independent. Optional: ``groups_span_classes`` (``True``
    when one group legitimately holds images of several classes, e.g. a patient's
    patches of several tissue types; ``cdft prepare`` then does not warn about it).
    It is not a protocol member, so objects without it still pass ``isinstance``.
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

    ``groups_span_classes``: ``False`` (the default) when a group in several classes is
    suspicious (a BreakHis patient filed under two tumour types: the report warns);
    ``True`` for datasets where it is normal (tissue-type tiles, one patient giving
    stroma, tumour and mucosa patches): the warning is then left out.
    """

    name: str = "dataset"
    classes: Sequence[str] = ()
    default_protocol: str = "standard"
    default_folds: int = 5
    group_column: str | None = None
    groups_span_classes: bool = False
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
            return stratified_group_folds(labels, group_keys(table, self.group_column), folds, seed)
        return stratified_folds(labels, folds, seed)

    def build_splits(
        self, table: pd.DataFrame, *, val_fold: int, test_fold: int, protocol: str
    ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        return split_table(table, self.protocols[protocol], val_fold, test_fold)


def group_keys(table: pd.DataFrame, column: str) -> list[str]:
    """Each row's group as text, for grouped folds; a row without one is a usage error.

    Why refuse: as text, every empty cell became the one group ``nan``, so the rows of many
    patients were kept together as a single "patient" and the group counts were wrong.
    Guessing (one group per row) would hide the gap; the user knows which patient it is.
    """
    import pandas as pd

    values = table[column].tolist()
    empty = [i for i, v in enumerate(values) if pd.isna(v) or not str(v).strip()]
    if empty:
        raise UsageError(
            f"{len(empty)} of {len(values)} rows have no {column} (e.g. {table['image_path'].iloc[empty[0]]!r}), "
            f"so their folds cannot keep each {column} whole; fill in the {column} column for every row, "
            f"or prepare without grouping (leave the {column} column out, or an image-level --split if the "
            f"dataset offers one)"
        )
    return [str(v) for v in values]


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
