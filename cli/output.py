"""Small printing helpers shared by the commands: aligned tables, JSON, warnings."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def warn(message: str) -> None:
    click.echo(f"cdft: warning: {message}", err=True)


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str], max_width: int = 80) -> str:
    """A plain aligned text table; the last column is cut to ``max_width`` characters."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    for row in cells:
        if len(row[-1]) > max_width:
            row[-1] = row[-1][: max_width - 1] + "…"
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report_plugin_problems(registry: Any) -> None:
    """Warn (never fail) about plugins that did not load, pointing at ``cdft plugins``."""
    for info in registry.problems():
        warn(f"plugin {info.name!r} failed to load: {info.error} (see `cdft plugins`)")
