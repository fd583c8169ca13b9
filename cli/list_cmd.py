"""``cdft list``: the registered components, grouped by kind."""

from __future__ import annotations

import click

from cdft_cli.output import echo_json, report_plugin_problems, table
from cdft_core.registry import KINDS, PLURALS, Component, get_registry, normalise_kind


@click.command("list")
@click.argument("kind", required=False)
@click.argument("pattern", required=False)
@click.option("--all", "include_all", is_flag=True, help="Include open-ended catalogues (e.g. every timm model).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of objects.")
def list_command(kind: str | None, pattern: str | None, include_all: bool, as_json: bool) -> None:
    """List components: KIND is datasets, backbones, adapters or strategies; PATTERN a glob.

    \b
    Examples:
      cdft list
      cdft list backbones 'vit_*clip*'
      cdft list backbones --all --json
    """
    if kind is not None:
        try:
            kind = normalise_kind(kind)
        except Exception:
            if pattern is None and any(ch in kind for ch in "*?["):
                kind, pattern = None, kind  # `cdft list 'vit_*'` filters every kind
            else:
                raise
    registry = get_registry()
    report_plugin_problems(registry)
    components = registry.list(kind, pattern, include_all=include_all)
    if as_json:
        echo_json([c.to_json() for c in components])
        return
    if not components:
        click.echo("no components match" + (f" {pattern!r}" if pattern else ""))
        return
    for k in KINDS:
        rows = [(c.name, c.provider, details(c), c.description) for c in components if c.kind == k]
        if rows:
            click.echo(f"{PLURALS[k]}:")
            click.echo(table(rows, ("name", "provider", "details", "description")))
            click.echo()


def details(component: Component) -> str:
    """The kind-specific facts worth a column; reads only cheap (non-lazy) metadata."""
    meta = component.metadata
    if meta.get("catalogue"):
        return "resolvable by name"
    if component.kind == "dataset":
        classes = meta.get("classes")
        if isinstance(classes, dict):  # per task: show the default task's classes
            task = meta.get("options", {}).get("task", {}).get("default")
            classes = classes.get(task, next(iter(classes.values()), []))
        shown = ",".join(classes) if isinstance(classes, (list, tuple)) else "from the data"
        return f"classes {shown}; protocol {meta.get('default_protocol', '?')}"
    if component.kind == "backbone":
        return ", ".join(str(meta[k]) for k in ("family", "pretraining") if meta.get(k))
    if component.kind == "adapter":
        return "trainable" if meta.get("has_parameters") else "no parameters"
    if component.kind == "strategy":
        stages = " -> ".join(meta.get("stages", []))
        return f"{stages}; adapter {meta.get('default_adapter', '?')}" if stages else ""
    return ""
