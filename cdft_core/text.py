"""Text rules every part of cdft shares: one-line errors, booleans, aligned tables.

One place for each, so that ``CDFT_STRICT_PLUGINS=no``, ``--no-pretrained`` in a YAML
preset and an adapter option ``residual=off`` all mean the same thing, and every error
line and table looks alike. Imports nothing heavy: the CLI and the registry use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")


def parse_bool(value: Any, *, what: str = "value") -> bool:
    """``true/yes/on/1`` and ``false/no/off/0`` (any case; empty is false) -> bool.

    Anything else is an error naming ``what``: a switch that silently reads ``no`` as
    *on* is worse than one that refuses it.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower() if value is not None else ""
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    from cdft_core.errors import UsageError

    raise UsageError(f"{what} must be true or false (1/0, yes/no, on/off), got {value!r}")


def env_flag(name: str) -> bool:
    """A boolean environment switch (``CDFT_DEBUG``, ``CDFT_STRICT_PLUGINS``...); unset is false."""
    import os

    return parse_bool(os.environ.get(name, ""), what=f"environment variable {name}")


def one_line(exc: object, limit: int = 300) -> str:
    """An exception (or any text) as one line for an error message: whitespace folded,
    cut at ``limit`` characters; an exception without text gives its type name."""
    text = " ".join(str(exc).split())
    if not text and isinstance(exc, BaseException):
        text = type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def text_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], *, numeric: bool = False,
               max_width: int | None = None) -> str:
    """A plain aligned table with a rule under the header.

    ``numeric``: columns after the first are right-aligned (metric tables); otherwise
    left-aligned (listings). ``max_width`` cuts the last column (long descriptions).
    """
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    if max_width is not None:
        for row in cells:
            if len(row[-1]) > max_width:
                row[-1] = row[-1][: max_width - 1] + "…"
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]

    def cell(i: int, text: str, width: int) -> str:
        return text.rjust(width) if numeric and i > 0 else text.ljust(width)

    lines = ["  ".join(cell(i, c, w) for i, (c, w) in enumerate(zip(row, widths, strict=True))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def jsonable(value: Any) -> Any:
    """``value`` with mappings, lists and scalars kept and anything else as its ``str``: safe for JSON."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
