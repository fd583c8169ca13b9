"""Split tables: read a split CSV, check it against its data root, write one atomically,
and record in it the dataset and options it was made with (:func:`record_options`).

Errors, one line each and raised before any training work:

- :class:`UsageError` (exit 2) when the *split file* is wrong: a CSV without a required
  column or with a non-integer label/fold; a label outside the classes; an image path
  that escapes the root.
- :class:`CdftError` (exit 1) when the *data on disk* is not what the table says: an
  image that is missing, unreadable or does not decode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cdft_core.data.protocol import SPLIT_COLUMNS
from cdft_core.errors import CdftError, UsageError
from cdft_core.files import atomic_write
from cdft_core.text import one_line

if TYPE_CHECKING:
    import pandas as pd

    from cdft_core.data.root import DataRoot

#: How many images :func:`~cdft_core.data.splits.load_splits` and ``prepare`` decode as a check by default.
DECODE_CHECK = 8

#: The last columns of a split file ``cdft prepare`` writes: the dataset and each option
#: it was made with, one value repeated on every row. Columns (not a header comment)
#: keep the file a plain CSV whose first line is ``image_path,label,fold,...``, and the
#: record travels with the file when it is copied or renamed.
DATASET_COLUMN = "cdft_dataset"
OPTION_PREFIX = "cdft_option_"


def record_options(table: pd.DataFrame, dataset: str, options: Mapping[str, str]) -> pd.DataFrame:
    """``table`` with the dataset and its options recorded as the last columns (any old record replaced)."""
    out = table.drop(columns=[c for c in table.columns if _is_record(c)])
    out[DATASET_COLUMN] = dataset
    for key, value in options.items():
        out[OPTION_PREFIX + key] = str(value)
    return out


def recorded_options(table: pd.DataFrame, source: str) -> tuple[pd.DataFrame, str | None, dict[str, str]]:
    """``(table without the record, dataset, options)`` of a split file; ``(table, None, {})``
    for a file without a record (the paper's, or one written before cdft recorded options).

    A record whose value differs between rows (two files pasted together) is refused:
    no single set of options describes the file.
    """
    import pandas as pd

    columns = [c for c in table.columns if _is_record(c)]
    values: dict[str, str] = {}
    for column in columns:
        seen = sorted({"" if pd.isna(v) else str(v) for v in table[column].tolist()})
        if len(seen) > 1:
            raise UsageError(
                f"split file {source} mixes values of {column}: {', '.join(seen[:3])}; "
                f"make one split file per dataset and options with `cdft prepare`"
            )
        if seen:
            values[column] = seen[0]
    options = {c[len(OPTION_PREFIX) :]: v for c, v in values.items() if c.startswith(OPTION_PREFIX)}
    return table.drop(columns=columns), values.get(DATASET_COLUMN), options


def _is_record(column: Any) -> bool:
    return str(column) == DATASET_COLUMN or str(column).startswith(OPTION_PREFIX)


#: a split table of a million images is ~100 MB: anything bigger is not one (and is not read whole)
MAX_SPLIT_BYTES = 512 << 20


def read_split_file(
    split_file: str, *, fs: Any = None, what: str = "split file", missing: str = "make one with `cdft prepare`"
) -> pd.DataFrame:
    """Read a split CSV as it is (columns are checked later).

    ``split_file`` is a local path or fsspec URL, or a path inside ``fs`` when given
    (a CSV stored under a data root). ``what`` names it in error lines; ``missing`` is
    the advice when it does not exist.
    """
    import io

    import fsspec
    import pandas as pd

    try:
        opener = fs.open(split_file, "rb") if fs is not None else fsspec.open(str(split_file), "rb")
        with opener as handle:
            data = handle.read(MAX_SPLIT_BYTES + 1)
        if len(data) > MAX_SPLIT_BYTES:
            raise UsageError(f"{what} {split_file!r} is over {MAX_SPLIT_BYTES >> 20} MiB, far more than a split "
                             f"table needs; pass the CSV written by `cdft prepare`")
        if b"\x00" in data:
            raise UsageError(f"{what} {split_file!r} holds NUL bytes: it is not a CSV text file; "
                             f"pass the CSV written by `cdft prepare`")
        # every cell stays a string: a recorded option "01" must not come back as 1, nor a
        # patient 13412 as 13412.0 in a column with an empty cell; label and fold are
        # checked and converted by check_table
        table = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, na_values=[""])
    except FileNotFoundError as exc:
        raise UsageError(f"{what} {split_file!r} does not exist; {missing}") from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UsageError(f"{what} {split_file!r} is not a readable CSV ({one_line(exc)})") from exc
    except (OSError, ValueError, ImportError) as exc:
        raise CdftError(f"cannot read {what} {split_file!r}: {one_line(exc)}") from exc
    return table


def integer_column(table: pd.DataFrame, column: str, where: Any) -> list[int]:
    """``column``'s cells as ints (``"3"`` and ``"3.0"`` alike: the cells are read as strings),
    or a usage error naming the first cell that is not a whole number (``where(row)`` says where)."""
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
    _refuse_repeats(table, source)
    table["label"] = integer_column(table, "label", where)
    if "fold" in table.columns:
        table["fold"] = integer_column(table, "fold", where)
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


def _refuse_repeats(table: pd.DataFrame, source: str) -> None:
    """An image listed twice (in one fold: double counting; in two: leakage) is refused, naming it."""
    first: dict[str, int] = {}
    for idx, path in enumerate(table["image_path"].tolist()):
        if path not in first:
            first[path] = idx
            continue
        where = f"split file {source} lines {first[path] + 2} and {idx + 2}" if source else "the dataset's table"
        raise UsageError(f"{where} list image {path!r} twice (leakage or double counting); keep one row per image")


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
    """Write a split table atomically (:func:`cdft_core.files.atomic_write`): a failure
    leaves any previous file untouched and no partial file behind."""
    atomic_write(destination, table.to_csv(index=False, lineterminator="\n").encode("utf-8"), what="split file")
