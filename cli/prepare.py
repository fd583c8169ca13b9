"""``cdft prepare NAME ROOT [dataset options] -o OUT.csv``: scan a dataset, write its split file.

Dataset options (``--task``, ``--magnification``, ... ) are declared by each dataset, so
this command accepts any ``--key value`` / ``--key=value`` after NAME and ROOT and checks
them against the dataset's declaration (``cdft list datasets --json`` shows them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import click

from cdft_cli.output import echo_json, report_plugin_problems, table, warn
from cdft_core.config import MAX_SEED
from cdft_core.errors import CdftError, UsageError

OWN_OPTIONS = ("--folds", "--seed", "-o/--output", "--json")


def parse_dataset_options(args: Sequence[str]) -> dict[str, str]:
    """``["--task", "subtype", "--split=image"]`` -> ``{"task": "subtype", "split": "image"}``."""
    out: dict[str, str] = {}
    tokens = list(args)
    while tokens:
        token = tokens.pop(0)
        if not token.startswith("--") or token == "--":
            raise UsageError(f"unexpected argument {token!r}; dataset options go after NAME ROOT as --key value")
        key, sep, value = token[2:].partition("=")
        if not sep:
            if not tokens or tokens[0].startswith("--"):
                raise UsageError(f"option --{key} needs a value")
            value = tokens.pop(0)
        key = key.replace("-", "_")
        if key in out:
            raise UsageError(f"option --{key.replace('_', '-')} is given twice")
        out[key] = value
    return out


def check_option_names(name: str, options: Mapping[str, str]) -> None:
    """Unknown dataset options: one line naming the dataset's options and this command's."""
    from cdft_core.data.options import declared_options
    from cdft_core.registry import get_registry

    declared = declared_options(get_registry().get("dataset", name))
    for key in options:
        if key not in declared:
            flags = ", ".join("--" + k.replace("_", "-") for k in declared) or "none"
            raise UsageError(
                f"unknown option --{key.replace('_', '-')} for `cdft prepare {name}`; "
                f"dataset options: {flags}; command options: {', '.join(OWN_OPTIONS)}"
            )


def format_summary(summary: Mapping[str, Any], output: str) -> str:
    """The text report: counts per class and per fold, then the leakage line."""
    grouped = summary["group_column"] is not None
    who = {"patient": "patients"}.get(summary["group_column"] or "", "groups")
    folds = [row["fold"] for row in summary["folds"]]
    options = " ".join(f"{k}={v}" for k, v in summary["options"].items())
    head = (
        f"{summary['dataset']}: {summary['images']} images"
        + (f", {summary['groups']} {who}" if grouped else "")
        + f", {len(summary['classes'])} classes, {len(folds)} folds (seed {summary['seed']})"
        + (f" [{options}]" if options else "")
        + f" -> {output}"
    )
    headers = ["class", "label", "images", *([who] if grouped else []), *(f"fold {f}" for f in folds)]
    rows: list[list[Any]] = []
    for row in summary["classes"]:
        rows.append(
            [
                row["name"],
                row["label"],
                row["images"],
                *([row["groups"]] if grouped else []),
                *(row["per_fold"][str(f)] for f in folds),
            ]
        )
    rows.append(
        [
            "total",
            "",
            summary["images"],
            *([summary["groups"]] if grouped else []),
            *(row["images"] for row in summary["folds"]),
        ]
    )
    if grouped:
        rows.append([who, "", "", "", *(row["groups"] for row in summary["folds"])])
    lines = [head, table(rows, headers)]
    if not grouped:
        lines.append("leakage: not checked (this dataset records no patient/group per image)")
    elif not summary["leakage"]:
        lines.append(f"leakage: none (no {who[:-1]} is in more than one fold)")
    else:
        shown = ", ".join(f"{r['group']} (folds {','.join(map(str, r['folds']))})" for r in summary["leakage"][:5])
        more = f", … {len(summary['leakage']) - 5} more" if len(summary["leakage"]) > 5 else ""
        lines.append(f"leakage: {len(summary['leakage'])} {who} in more than one fold: {shown}{more}")
    return "\n".join(lines)


def dataset_name_in(args: Sequence[str]) -> str | None:
    """The NAME argument in raw ``cdft prepare`` arguments (skipping this command's options), if any."""
    tokens = list(args)
    while tokens:
        token = tokens.pop(0)
        if token in ("--folds", "--seed", "-o", "--output"):
            tokens = tokens[1:]
        elif not token.startswith("-"):
            return token
    return None


def dataset_options_help(name: str | None) -> tuple[str, list[tuple[str, str]]]:
    """The help section of dataset NAME's options: (title, [(flag and choices, help and default)])."""
    from cdft_core.data.options import declared_options
    from cdft_core.registry import get_registry

    if name is None:
        return "Dataset options", [("NAME --help", "lists the options of dataset NAME (`cdft list datasets`)")]
    try:
        declared = declared_options(get_registry().get("dataset", name))
    except CdftError as exc:
        return "Dataset options", [(name, str(exc))]
    rows = []
    for key, spec in declared.items():
        kind = "[" + "|".join(spec["choices"]) + "]" if spec.get("choices") else "TEXT"
        default = f" [default: {spec['default']}]" if spec.get("default") is not None else ""
        rows.append((f"--{key.replace('_', '-')} {kind}", f"{spec.get('help') or ''}{default}"))
    return f"Options of dataset {name!r}", rows or [("(none)", f"dataset {name!r} declares no options")]


class PrepareCommand(click.Command):
    """``cdft prepare``: its ``--help`` also lists the options of the dataset it names."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["cdft_prepare_args"] = list(args)  # --help is eager: NAME is not parsed when help is printed
        return super().parse_args(ctx, args)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_options(ctx, formatter)
        title, rows = dataset_options_help(dataset_name_in(ctx.meta.get("cdft_prepare_args", [])))
        with formatter.section(title):
            formatter.write_dl(rows)


@click.command(
    "prepare",
    cls=PrepareCommand,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.argument("name")
@click.argument("root")
@click.option("--folds", type=click.IntRange(min=2), default=None, help="Number of folds [default: the dataset's].")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=1, show_default=True,
              help="Seed of the fold assignment (the paper: 1).")
@click.option("-o", "--output", required=True, help="The split CSV to write (path or fsspec URL).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def prepare_command(
    ctx: click.Context, name: str, root: str, folds: int | None, seed: int, output: str, as_json: bool
) -> None:
    """Scan dataset NAME under ROOT and write a split CSV (image_path,label,fold,...).

    Dataset options come after NAME and ROOT as --key value; `cdft prepare NAME --help`
    lists them (and `cdft list datasets --json` every dataset's). The split file records
    the dataset and its options; `cdft run` checks its own against them. ROOT may be a local path or an fsspec URL
    (file://, memory://, zip://FOLDER::/path/data.zip, s3://...).

    \b
    Examples:
      cdft prepare breakhis /data/BreaKHis_v1 --task malignant-subtype \\
          --magnification 200X --split patient --folds 5 -o breakhis_200x.csv
      cdft prepare hcrf /data/HCRF --folds 4 -o hcrf.csv
      cdft prepare csv /data/tiles --table labels.csv -o tiles_split.csv
    """
    from cdft_core.data.report import warnings_of
    from cdft_core.data.splits import prepare_with_summary
    from cdft_core.data.tables import write_split_file
    from cdft_core.inference.inputs import check_output
    from cdft_core.registry import get_registry

    check_output(output, "split file")  # before the scan: a bad -o costs a second, not a whole dataset's scan
    options = parse_dataset_options(ctx.args)
    registry = get_registry()
    report_plugin_problems(registry)
    check_option_names(name, options)
    split, summary = prepare_with_summary(name, root, options=options, folds=folds, seed=seed, registry=registry)
    write_split_file(split, output)
    notes = warnings_of(summary)
    if as_json:
        echo_json({**summary, "output": output, "warnings": notes})
    else:
        click.echo(format_summary(summary, output))
    for note in notes:
        warn(note)
