"""The results table — rows dataset × backbone × strategy, each metric as mean ± standard
deviation over the row's runs with their n — as Markdown, CSV, LaTeX and printed text.

Why the statistics come from :func:`cdft_core.experiments.cv_summary.describe`: a row of a
complete cross-validation must show exactly the numbers of its ``cv_summary.json`` (the
sample standard deviation, Student's 95 % interval), so both are computed by one function.
A row's ``n`` is its number of runs (marked ``(partial: 3/5 rotations)``, and in the CSV's
``partial`` column, when it holds rotations of an unfinished cross-validation); a metric that some runs lack (a ROC-AUC without
predictions, patient figures of a dataset without patients) shows its own smaller n. A run of a split and seed
another run of the row already has is a duplicate, left out of n and every statistic by the paired comparisons' own
rule (:func:`~cdft_core.reports.rows.one_per_split`); the n says how many (``3 (2 duplicate run(s) of one split and
seed left out)``), the CSV's ``duplicates`` column too.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from typing import Any

from cdft_core.reports.rows import LABELS, Row, duplicates_note, metric_names

MISSING = "–"


def row_statistics(row: Row) -> dict[str, dict[str, Any]]:
    """Each metric the row has: ``{"n", "mean", "std", "ci95"}`` over its runs."""
    from cdft_core.experiments.cv_summary import describe

    return {name: describe(values) for name in metric_names() if (values := row.values(name))}


def shown_metrics(table: Sequence[Mapping[str, Any]]) -> list[str]:
    """The metrics at least one row has (a column nobody has is left out of the shown tables, kept in the CSV)."""
    return [name for name in metric_names() if any(name in stats for stats in table)]


def cell(stats: Mapping[str, Any] | None, n: int) -> str:
    """``0.9120 ± 0.0210``, its n added when it differs from the row's ``n``; ``–`` when absent."""
    if stats is None:
        return MISSING
    text = f"{stats['mean']:.4f}" if stats["std"] is None else f"{stats['mean']:.4f} ± {stats['std']:.4f}"
    return text if stats["n"] == n else f"{text} (n={stats['n']})"


def n_cell(row: Row) -> str:
    """The row's n with what qualifies it: ``3 (partial: 3/5 rotations; 2 duplicate run(s) of one split and seed left out)``."""
    notes = n_notes(row)
    return f"{row.n} ({'; '.join(notes)})" if notes else str(row.n)


def n_notes(row: Row) -> list[str]:
    """What qualifies a row's n: partial, duplicates left out (none: ``[]``)."""
    return [note for note in (row.partial, duplicates_note(row.duplicates)) if note]


def _has_settings(rows: Sequence[Row]) -> bool:
    return any(row.setting for row in rows)


def cells(rows: Sequence[Row], table: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells the shown tables share."""
    metrics = shown_metrics(table)
    settings = _has_settings(rows)
    headers = ["dataset", "backbone", "strategy", *(["setting"] if settings else []), "n",
               *(LABELS[m] for m in metrics)]
    body = []
    for row, stats in zip(rows, table, strict=True):
        body.append([row.dataset, row.backbone, row.strategy, *([row.setting] if settings else []),
                     n_cell(row),
                     *(cell(stats.get(m), row.n) for m in metrics)])
    return headers, body


def caption(split: str) -> str:
    return (f"{split.capitalize()} metrics at each run's best validation epoch: mean ± sample standard deviation over the runs "
            f"of a row (the rotations of its cross-validations and its repeated runs); n runs, one per split and seed "
            f"(duplicates left out, counted beside n)")


def markdown(rows: Sequence[Row], table: Sequence[Mapping[str, Any]], split: str) -> str:
    """``results.md``: a title, what the numbers are, the table."""
    headers, body = cells(rows, table)

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [f"# Results ({split})", "", caption(split) + ".", "", line(headers),
             "|" + "|".join("---" if i < len(headers) - len(shown_metrics(table)) else "---:"
                            for i in range(len(headers))) + "|"]
    lines += [line(cells) for cells in body]
    return "\n".join(lines) + "\n"


def text(rows: Sequence[Row], table: Sequence[Mapping[str, Any]]) -> str:
    """The table as ``cdft report`` prints it."""
    from cdft_core.text import text_table

    headers, body = cells(rows, table)
    return text_table(body, headers)


def csv_text(rows: Sequence[Row], table: Sequence[Mapping[str, Any]], split: str) -> str:
    """``results.csv``: every metric's n, mean, std and 95 % CI bounds, full precision (empty when absent)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    names = metric_names()
    writer.writerow(["dataset", "backbone", "strategy", "setting", "split", "runs", "partial", "duplicates",
                     *(f"{m}_{part}" for m in names for part in ("n", "mean", "std", "ci95_low", "ci95_high"))])
    for row, stats in zip(rows, table, strict=True):
        values: list[Any] = []
        for name in names:
            s = stats.get(name)
            if s is None:
                values += [""] * 5
                continue
            ci = s["ci95"] or ["", ""]
            values += [s["n"], repr(s["mean"]), "" if s["std"] is None else repr(s["std"]), *map(str, ci)]
        writer.writerow([row.dataset, row.backbone, row.strategy, row.setting, split, row.n, row.partial,
                         row.duplicates, *values])
    return out.getvalue()


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(value: str) -> str:
    """``value`` as LaTeX text: special characters escaped, ± and – as LaTeX spells them."""
    escaped = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in value)
    return escaped.replace("±", r"$\pm$").replace(MISSING, "--")


def latex(rows: Sequence[Row], table: Sequence[Mapping[str, Any]], split: str) -> str:
    """``results.tex``: a booktabs table (``\\usepackage{booktabs}``) with the same cells."""
    headers, body = cells(rows, table)
    numeric = len(shown_metrics(table))
    spec = "l" * (len(headers) - numeric - 1) + "r" + "r" * numeric
    lines = ["% cdft report: needs \\usepackage{booktabs}", "\\begin{table}[t]", "\\centering",
             f"\\caption{{{latex_escape(caption(split))}.}}", f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
             " & ".join(latex_escape(h) for h in headers) + r" \\", "\\midrule"]
    lines += [" & ".join(latex_escape(c) for c in cells) + r" \\" for cells in body]
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines) + "\n"
