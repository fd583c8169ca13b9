"""``report.html``: the whole report as one self-contained page.

Why self-contained: a report is mailed, attached to a ticket, opened on a laptop without
the run directories. Every figure is embedded as a ``data:image/png;base64`` URI, the
style sheet is inline, and nothing is fetched (no script, font or stylesheet from
elsewhere), so the one file opens the same in any browser, offline. Every piece of text
taken from the runs (names, paths, settings) is escaped.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Container, Iterable, Sequence
from html import escape
from typing import TYPE_CHECKING

from cdft_core.reports import table as table_lib
from cdft_core.reports.compare import FEW, FEW_NOTE, SHOWN_HEADERS, shown
from cdft_core.reports.plots import Plot

if TYPE_CHECKING:
    from cdft_core.reports.build import Report

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
figure { display: inline-block; margin: 0.5em 1em 1em 0; vertical-align: top; }
figcaption { font-size: 0.8em; color: #555; max-width: 760px; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.note { color: #7a4b00; }
code { font-size: 0.9em; }
"""


def render(report: Report) -> str:
    """The page: results, incomplete runs, cross-validations, comparisons, figures, notes."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>cdft report</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        "<h1>cdft report</h1>",
        f"<p>{len(report.collection.runs)} complete run(s) in {len(report.rows)} row(s), "
        f"{len(report.collection.incomplete)} incomplete run(s) left out; searched: "
        + ", ".join(f"<code>{escape(s)}</code>" for s in report.collection.sources) + ".</p>",
        '<nav><a href="#results">Results</a> · <a href="#incomplete">Incomplete runs</a> · '
        '<a href="#cv">Cross-validations</a> · <a href="#comparisons">Paired comparisons</a> · '
        '<a href="#strategies">Strategies</a> · <a href="#rows">Figures per row</a> · '
        '<a href="#notes">Notes</a></nav>',
        *_results(report),
        *_incomplete(report),
        *_parents(report),
        *_comparisons(report),
        '<h2 id="strategies">Strategies per backbone</h2>',
        *_figures(report, [p for p in report.plots if p.row is None]),
        *_rows(report),
        *_notes(report),
        "</body>",
        "</html>",
    ]
    return "\n".join(parts) + "\n"


def _table(headers: Sequence[str], body: Iterable[Sequence[str]], numeric: Container[int]) -> list[str]:
    """An HTML table; the columns at the ``numeric`` positions are right-aligned."""
    lines = ["<table>", "<thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in headers) + "</tr></thead>", "<tbody>"]
    for cells in body:
        lines.append("<tr>" + "".join(
            f'<td class="num">{escape(c)}</td>' if i in numeric else f"<td>{escape(c)}</td>"
            for i, c in enumerate(cells)) + "</tr>")
    lines += ["</tbody>", "</table>"]
    return lines


def _results(report: Report) -> list[str]:
    headers, body = table_lib.cells(report.rows, report.table)
    out = ['<h2 id="results">Results</h2>', f"<p>{escape(table_lib.caption(report.split))}. "
           "Also written as <code>results.md</code>, <code>results.csv</code> and <code>results.tex</code>.</p>"]
    if not body:
        return [*out, "<p>No complete run: nothing to tabulate.</p>"]
    return out + _table(headers, body, range(headers.index("n"), len(headers)))


def _incomplete(report: Report) -> list[str]:
    items = report.collection.incomplete
    out = ['<h2 id="incomplete">Incomplete runs (left out of every number and figure)</h2>']
    if not items:
        return [*out, "<p>None.</p>"]
    return [*out, "<ul>", *(f"<li><code>{escape(i.path)}</code>: {escape(i.reason)}</li>" for i in items), "</ul>"]


def _parents(report: Report) -> list[str]:
    parents = report.collection.parents
    out = ['<h2 id="cv">Cross-validations</h2>']
    if not parents:
        return [*out, "<p>None (single runs only).</p>"]
    body = [[p.path, f"{p.complete} of {p.chosen}", "yes" if p.summarised else "no"] for p in parents]
    return out + _table(["parent", "rotations complete", "cv_summary.json"], body, {1})


def _comparisons(report: Report) -> list[str]:
    out = ['<h2 id="comparisons">Paired comparisons</h2>',
           "<p>Paired: each difference is taken between two runs on the same split (dataset, protocol, "
           "validation and test fold, seed), a − b; the interval is Student's 95 % interval of the mean "
           "difference; the p-values are the Wilcoxon signed-rank test and the paired t-test (scipy), two-sided. "
           f"With fewer than {FEW} pairs a comparison says “{escape(FEW_NOTE)}”: the Wilcoxon test cannot reach "
           "p &lt; 0.05 with 5 pairs or fewer, and the t-test's normality cannot be checked. "
           "Also written as <code>comparisons.csv</code>.</p>"]
    if not report.comparisons:
        return [*out, "<p>None: no two rows share a dataset and a backbone or a strategy with runs on the same "
                "splits.</p>"]
    numeric = range(SHOWN_HEADERS.index("n"), SHOWN_HEADERS.index("note"))
    return out + _table(SHOWN_HEADERS, [shown(c) for c in report.comparisons], numeric)


def _rows(report: Report) -> list[str]:
    out = ['<h2 id="rows">Figures per row</h2>']
    for row in report.rows:
        qualified = "".join(f"; {note}" for note in table_lib.n_notes(row))
        out.append(f'<h3 id="row-{escape(row.slug)}">{escape(row.label)} (n={row.n}{escape(qualified)})</h3>')
        out += _figures(report, [p for p in report.plots if p.row == row.slug])
        notes = [n for n in report.notes if n.startswith(f"{row.label}: ")]
        if notes:
            out += ["<ul>", *(f'<li class="note">{escape(n)}</li>' for n in notes), "</ul>"]
    return out


def _figures(report: Report, plots: Sequence[Plot]) -> list[str]:
    if not plots:
        return ["<p>No figure.</p>"]
    return [_figure(report.output, plot) for plot in plots]


def _figure(out_dir: str, plot: Plot) -> str:
    with open(os.path.join(out_dir, plot.file), "rb") as handle:
        data = base64.b64encode(handle.read()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{escape(plot.title)}">'
            f"<figcaption>{escape(plot.title)} (<code>{escape(plot.file)}</code>)</figcaption></figure>")


def _notes(report: Report) -> list[str]:
    out = ['<h2 id="notes">Notes</h2>']
    if not report.notes:
        return [*out, "<p>None.</p>"]
    return [*out, "<ul>", *(f'<li class="note">{escape(n)}</li>' for n in report.notes), "</ul>"]
