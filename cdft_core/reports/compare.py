"""Paired comparisons: two strategies on one backbone, or two backbones with one strategy,
on the same splits — the Wilcoxon signed-rank test and the paired t-test, with the mean
difference and its 95 % interval.

Why paired: two results of one cross-validation protocol share their splits, and the
split explains much of the spread (a hard test fold is hard for every model). Comparing
each rotation with itself removes that part; comparing two means does not. Two runs
pair when they have the same dataset, protocol, validation and test fold and seed
(:attr:`~cdft_core.reports.collect.Run.pair_key`); runs without a partner are left out
and the n says how many pairs remain.

Why rows pair by their configuration, not their labels: a row's setting label names only
what varies within its dataset, backbone and strategy, so one more run of one triple
relabels its rows while the others keep theirs. Two rows pair when every value that
changes the measurement agrees except the compared axis's own (:data:`AXIS_KEYS`).

Why both tests, and the note: the Wilcoxon test assumes no normality but with 5 pairs its
smallest possible two-sided p is 0.0625, with 3 pairs 0.25 — it cannot reject anything
with the 3 to 5 rotations a protocol has. The t-test can, but leans on normal
differences that so few pairs cannot check. Below :data:`FEW` pairs each comparison says
"n too small to mean much"; read the interval of the difference rather than a p-value.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from cdft_core.reports.rows import Row, duplicates_note, one_per_split, same_value, shown_key

#: the metrics compared (those the runs have)
COMPARED = ("accuracy", "f1_macro", "f1_paper", "roc_auc")
#: fewer pairs than this: the comparison says it means little
FEW = 5
FEW_NOTE = "n too small to mean much"
#: differences are rounded to this many decimals before testing (floating-point noise is not a difference)
DIGITS = 12
#: flat configuration keys that belong to the compared axis (one ending in "." covers a mapping's keys): a
#: strategy brings its options and its adapter (unset, the adapter is the strategy's default), a backbone its weights
AXIS_KEYS = {"strategy": ("strategy_options.", "adapter", "adapter_options."), "backbone": ("weights",)}


#: the columns of ``comparisons.csv`` (:meth:`Comparison.to_row`)
CSV_FIELDS = ["dataset", "compares", "within", "setting", "a", "b", "metric", "n_pairs", "mean_diff_a_minus_b",
              "ci95_low", "ci95_high", "wilcoxon_p", "paired_t_p", "note"]


@dataclass(frozen=True)
class Comparison:
    """``a − b`` on ``metric`` over ``n`` paired runs."""

    dataset: str
    kind: str          # "strategy" (same backbone) or "backbone" (same strategy)
    within: str        # the backbone (or strategy) both sides share
    setting: str
    a: str
    b: str
    metric: str
    n: int
    mean_diff: float | None
    ci95: tuple[float, float] | None
    wilcoxon_p: float | None
    ttest_p: float | None
    note: str

    def to_row(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "compares": self.kind, "within": self.within, "setting": self.setting,
                "a": self.a, "b": self.b, "metric": self.metric, "n_pairs": self.n, "mean_diff_a_minus_b": self.mean_diff,
                "ci95_low": self.ci95[0] if self.ci95 else None, "ci95_high": self.ci95[1] if self.ci95 else None,
                "wilcoxon_p": self.wilcoxon_p, "paired_t_p": self.ttest_p, "note": self.note}


def compare_rows(rows: Sequence[Row], metrics: Sequence[str] = COMPARED) -> list[Comparison]:
    """Every pair of rows of one dataset and setting that differs in exactly the strategy
    or exactly the backbone, on each metric both have paired values of."""
    out: list[Comparison] = []
    for first, second in combinations(rows, 2):
        if first.dataset != second.dataset:
            continue
        if first.backbone == second.backbone and first.strategy != second.strategy:
            kind, within, a, b = "strategy", first.backbone, first.strategy, second.strategy
        elif first.strategy == second.strategy and first.backbone != second.backbone:
            kind, within, a, b = "backbone", first.strategy, first.backbone, second.backbone
        else:
            continue
        if not same_setting(first, second, kind):
            continue
        setting = shared_setting(first, second)
        for metric in metrics:
            left, right, dropped = paired_values(first, second, metric)
            if not left:
                continue
            result = paired_test(left, right)
            notes = [*result.pop("notes"), *([duplicates_note(dropped)] if dropped else [])]
            out.append(Comparison(first.dataset, kind, within, setting, a, b, metric, len(left),
                                  note="; ".join(notes), **result))
    return out


def same_setting(first: Row, second: Row, kind: str) -> bool:
    """Whether two rows were run the same way but for the compared axis (``kind``): every flat
    configuration key agrees, the axis's own (:data:`AXIS_KEYS`) aside. A row whose configuration
    could not be read pairs with nothing."""
    if first.config is None or second.config is None:
        return False
    keys = set(first.config) | set(second.config)
    return all(same_value(first.config, second.config, key) for key in keys if not _on_axis(key, kind))


def _on_axis(key: str, kind: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in AXIS_KEYS[kind])


def shared_setting(first: Row, second: Row) -> str:
    """The comparison's setting: the keys either row's label names, with their values
    (``adapter=cdtm − none`` for an axis key the two sides differ in); ``""`` when neither names any."""
    keys = sorted(set(first.named) | set(second.named))
    values = [(k, first.shown(k), second.shown(k)) for k in keys]
    return ", ".join(f"{shown_key(k)}={a}" if a == b else f"{shown_key(k)}={a} − {b}" for k, a, b in values)


def paired_values(first: Row, second: Row, metric: str) -> tuple[list[float], list[float], int]:
    """The two rows' values of ``metric`` on the splits both ran (in pair-key order), and
    how many duplicate runs were left out (the results table's rule: :func:`~cdft_core.reports.rows.one_per_split`)."""
    sides = []
    dropped = 0
    for row in (first, second):
        kept, left_out = one_per_split(row.samples, metric)
        dropped += left_out
        sides.append({sample.run.pair_key: sample.values[metric] for sample in kept})
    keys = sorted(set(sides[0]) & set(sides[1]), key=repr)
    return [sides[0][k] for k in keys], [sides[1][k] for k in keys], dropped


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Mean of ``a − b``, its Student-t 95 % interval, the Wilcoxon and paired-t p-values, and notes.

    The t-test on the differences is scipy's ``ttest_rel(a, b)``; the Wilcoxon test drops
    zero differences (its default). Degenerate cases get a value and a note instead of a
    warning or an exception: one pair has no test; all differences zero give p = 1 (no
    evidence of any difference); a constant non-zero difference leaves the t statistic
    undefined (p None) while the Wilcoxon test still ranks it.
    """
    from scipy import stats

    from cdft_core.experiments.cv_summary import describe

    # rounded: 0.9 - 0.8 and 0.8 - 0.7 differ in the 17th digit, and a t-test would read that
    # noise as an almost zero spread (p = 1e-78); metrics carry nowhere near 12 significant digits
    diffs = [round(x - y, DIGITS) for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    summary = describe(diffs)
    ci = tuple(summary["ci95"]) if summary["ci95"] else None
    notes: list[str] = []
    wilcoxon_p = ttest_p = None
    if n < 2:
        notes.append("one pair: no test")
    elif all(d == 0 for d in diffs):
        wilcoxon_p = ttest_p = 1.0
        notes.append("all differences are zero")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                wilcoxon_p = _finite(stats.wilcoxon(diffs).pvalue)
            except ValueError:
                wilcoxon_p = None
            if len(set(diffs)) == 1:
                notes.append("constant difference: the t-test is undefined")
            else:
                ttest_p = _finite(stats.ttest_1samp(diffs, 0.0).pvalue)  # the paired t-test of a and b
        if any(d == 0 for d in diffs):
            notes.append("zero differences dropped by the Wilcoxon test")
    if n < FEW:
        notes.append(FEW_NOTE)
    return {"mean_diff": summary["mean"], "ci95": ci, "wilcoxon_p": wilcoxon_p, "ttest_p": ttest_p, "notes": notes}


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def comparisons_csv(comparisons: Sequence[Comparison]) -> str:
    """``comparisons.csv``: one line per comparison, full precision, empty cells for no value."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for comparison in comparisons:
        writer.writerow({k: "" if v is None else v for k, v in comparison.to_row().items()})
    return out.getvalue()


def comparisons_text(comparisons: Sequence[Comparison]) -> str:
    """The comparisons as ``cdft report`` prints them."""
    from cdft_core.text import text_table

    return text_table([shown(c) for c in comparisons], SHOWN_HEADERS)


PLURAL = {"strategy": "strategies", "backbone": "backbones"}
SHOWN_HEADERS = ["dataset", "compares", "within", "a − b", "metric", "n", "mean diff", "95% CI", "Wilcoxon p",
                 "paired t p", "note"]


def shown(c: Comparison) -> list[str]:
    """A comparison's cells as the printed and HTML tables show them."""
    def p(value: float | None) -> str:
        return "–" if value is None else f"{value:.3g}"

    ci = "–" if c.ci95 is None else f"[{c.ci95[0]:+.4f}, {c.ci95[1]:+.4f}]"
    diff = "–" if c.mean_diff is None else f"{c.mean_diff:+.4f}"
    within = f"{c.within} ({c.setting})" if c.setting else c.within
    return [c.dataset, PLURAL[c.kind], within, f"{c.a} − {c.b}", c.metric, str(c.n), diff, ci, p(c.wilcoxon_p),
            p(c.ttest_p), c.note]
