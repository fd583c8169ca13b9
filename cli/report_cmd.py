"""``cdft report DIR... [-o OUT]``: the results of runs, cross-validations and grids as
tables, plots, paired comparisons and one self-contained HTML page.

Thin on purpose: it parses, calls :func:`cdft_core.reports.build.write_report` and prints
what the report found (the table, the incomplete runs, the comparisons).
"""

from __future__ import annotations

import click

from cdft_cli.output import warn

#: printed notes beyond this many are counted, not listed (report.html lists them all)
SHOWN_NOTES = 10


@click.command("report")
@click.argument("dirs", nargs=-1, required=True, metavar="DIR...",
                type=click.Path(exists=True, file_okay=False, dir_okay=True))
@click.option("-o", "--output", default="cdft-report", show_default=True, metavar="OUT",
              help="The report's directory: new, empty or an earlier report's (its files are replaced).")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True,
              help="The split whose metrics the table, figures and comparisons show.")
def report_command(dirs: tuple[str, ...], output: str, split: str) -> None:
    """Report what the runs under DIR... found: single runs, `cdft cv` parents and `cdft grid`
    outputs, in any mix, searched recursively.

    Writes OUT/results.md, results.csv and results.tex (rows dataset × backbone ×
    strategy, each metric as mean ± std over the runs with n), OUT/plots/*.png (confusion
    matrices, ROC curves, learning curves, strategies per backbone), OUT/comparisons.csv
    (paired Wilcoxon and t-tests of strategies and backbones on the same splits) and
    OUT/report.html, a single self-contained page. Incomplete runs are listed and left out.

    \b
    Examples:
      cdft report runs/paper
      cdft report runs/breakhis-vit-linear-cv-s1-20250101-120000 runs/breakhis-vit-staged-cv-s1-20250101-130000 -o out
    """
    from cdft_core.reports.build import write_report
    from cdft_core.reports.compare import comparisons_text
    from cdft_core.reports.table import caption, text

    report = write_report(list(dirs), output, split)
    found = report.collection
    click.echo(f"{len(found.runs)} complete run(s) in {len(report.rows)} row(s). {caption(split)}.\n")
    click.echo(text(report.rows, report.table) if report.rows else "no complete run: nothing to tabulate")
    if found.incomplete:
        click.echo(f"\nincomplete, left out of every number and figure ({len(found.incomplete)}):")
        for item in found.incomplete:
            click.echo(f"  {item.path}: {item.reason}")
    if report.comparisons:
        click.echo("\npaired comparisons (runs on the same splits; a − b):")
        click.echo(comparisons_text(report.comparisons))
    for note in report.notes[:SHOWN_NOTES]:
        warn(note)
    if len(report.notes) > SHOWN_NOTES:
        warn(f"{len(report.notes) - SHOWN_NOTES} more notes in {output}/report.html")
    click.echo(f"\nreport: {output}/report.html  (results.md, results.csv, results.tex, comparisons.csv, plots/)")
