"""``cdft plugins``: what is installed, what each plugin implements, and why one failed."""

from __future__ import annotations

import click

from cdft_cli.output import echo_json, table
from cdft_core.registry import get_registry


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of objects.")
def plugins_command(as_json: bool) -> None:
    """Show each plugin: distribution, version, hooks, status and load error.

    This is the command that diagnoses broken plugins, so it loads them without
    ``CDFT_STRICT_PLUGINS`` (a broken plugin is shown, not raised) and prints whole errors.
    """
    registry = get_registry(strict=False)
    if as_json:
        echo_json([p.to_json() for p in registry.plugins])
        return
    rows = [
        (
            p.name,
            f"{p.distribution} {p.version}".strip(),
            ",".join(h.replace("register_", "") for h in p.hooks) or "-",
            p.status if p.error is None else f"{p.status}: {p.error}",
        )
        for p in registry.plugins
    ]
    click.echo(table(rows, ("plugin", "distribution", "hooks", "status"), max_width=None))
