"""``cdft show KIND NAME``: everything the registry knows about one component."""

from __future__ import annotations

import click

from cdft_cli.output import echo_json, report_plugin_problems
from cdft_core.registry import get_registry


@click.command("show")
@click.argument("kind")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def show_command(kind: str, name: str, as_json: bool) -> None:
    """Describe one component; NAME is resolved like `cdft run` resolves it.

    \b
    Examples:
      cdft show dataset breakhis
      cdft show backbone vit_base_patch16_clip_224.laion2b
      cdft show backbone hf-hub:timm/vit_small_patch16_224.augreg_in21k
    """
    registry = get_registry()
    report_plugin_problems(registry)
    info = registry.get(kind, name).to_json()
    if as_json:
        echo_json(info)
        return
    for key in ("name", "kind", "provider", "description"):
        click.echo(f"{key}: {info[key]}")
    for key, value in info["metadata"].items():
        click.echo(f"{key}: {_format(value)}")


def _format(value: object) -> str:
    if isinstance(value, dict):
        return "; ".join(f"{k}={_format(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_format(v) for v in value)
    return str(value)
