"""``cdft report``'s work: collect the runs, group them, and write every file of the report
into its own directory.

Why the output directory is guarded: the report rewrites its files, so it must never
write into a directory that holds something else (a run, a dataset, a home folder). A
directory is accepted when it does not exist, is empty, or carries :data:`REPORT_MARKER`
(an earlier report, whose files are then replaced — stale figures of rows that no
longer exist included). The search skips report directories, so a report may live
inside the runs it describes.

Layout::

    OUT/results.md, results.csv, results.tex   the results table
    OUT/comparisons.csv                        the paired comparisons
    OUT/plots/*.png                            the figures
    OUT/report.html                            all of it in one self-contained page
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cdft_core.errors import CdftError, UsageError
from cdft_core.reports.collect import REPORT_MARKER, Collection, collect
from cdft_core.reports.compare import Comparison
from cdft_core.reports.plots import Plot
from cdft_core.reports.rows import Row
from cdft_core.text import one_line

#: the files a report writes besides its plots (and the only ones it removes when it rewrites one)
FILES = ("results.md", "results.csv", "results.tex", "comparisons.csv", "report.html")
SPLITS = ("test", "val")


@dataclass
class Report:
    """What a report found and where it wrote it."""

    output: str
    split: str
    collection: Collection
    rows: list[Row]
    table: list[dict[str, Any]]
    comparisons: list[Comparison]
    plots: list[Plot]
    notes: list[str]


def check_output(output: str) -> None:
    """Refuse (usage error) an output that is a file or a directory other than an earlier report."""
    if not os.path.exists(output):
        return
    if not os.path.isdir(output):
        raise UsageError(f"-o {output!r} is a file; name a directory for the report")
    if os.listdir(output) and not os.path.isfile(os.path.join(output, REPORT_MARKER)):
        raise UsageError(f"-o {output!r} exists and is not a cdft report directory; name a new or empty "
                         f"directory (an earlier report's directory is rewritten)")


def write_report(sources: Sequence[str], output: str, split: str = "test") -> Report:
    """Collect the runs under ``sources`` and write the report into ``output``."""
    from cdft_core.reports import html, table
    from cdft_core.reports.compare import compare_rows, comparisons_csv
    from cdft_core.reports.plots import draw_all
    from cdft_core.reports.rows import build_rows

    if split not in SPLITS:
        raise UsageError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    check_output(output)
    collection = collect(sources)
    if not collection.runs and not collection.incomplete:
        shown = ", ".join(repr(s) for s in sources)
        raise UsageError(f"no cdft runs found under {shown} (looked for config.yaml, metrics.jsonl, summary.json, cv.json)")
    rows = build_rows(collection.runs, split)
    statistics = [table.row_statistics(row) for row in rows]
    comparisons = compare_rows(rows)
    try:
        _prepare(output)
        plots, notes = draw_all(rows, split, output)
        report = Report(output, split, collection, rows, statistics, comparisons, plots, notes)
        _write(output, "results.md", table.markdown(rows, statistics, split))
        _write(output, "results.csv", table.csv_text(rows, statistics, split))
        _write(output, "results.tex", table.latex(rows, statistics, split))
        _write(output, "comparisons.csv", comparisons_csv(comparisons))
        _write(output, "report.html", html.render(report))
    except OSError as exc:
        raise CdftError(f"cannot write the report in {output!r}: {one_line(exc)}") from exc
    return report


def _prepare(output: str) -> None:
    """Create (or clear the files of an earlier report in) ``output`` and mark it as a report."""
    os.makedirs(os.path.join(output, "plots"), exist_ok=True)
    with open(os.path.join(output, REPORT_MARKER), "w", encoding="utf-8") as handle:
        handle.write("cdft report directory: `cdft report -o` may rewrite it\n")
    for name in FILES:
        path = os.path.join(output, name)
        if os.path.isfile(path):
            os.remove(path)
    for path in glob.glob(os.path.join(output, "plots", "*.png")):
        os.remove(path)


def _write(output: str, name: str, text: str) -> None:
    from cdft_core.files import atomic_write

    atomic_write(os.path.join(output, name), text.encode("utf-8"), what=f"report file {name}")
