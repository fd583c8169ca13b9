"""Small printing helpers shared by the commands: aligned tables, JSON, warnings."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click

from cdft_core.text import text_table


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def warn(message: str) -> None:
    click.echo(f"cdft: warning: {message}", err=True)


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str], max_width: int | None = 80) -> str:
    """A listing table; the last column (descriptions) is cut to ``max_width`` characters
    (``None``: never cut, for columns that must be read whole, such as load errors)."""
    return text_table(rows, headers, max_width=max_width)


def report_plugin_problems(registry: Any) -> None:
    """Warn (never fail) about plugins that did not load, pointing at ``cdft plugins``."""
    for info in registry.problems():
        warn(f"plugin {info.name!r} failed to load: {info.error} (see `cdft plugins`)")
