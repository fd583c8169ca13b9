"""What a cross-validation found: every metric of every rotation, and its mean, standard
deviation and 95 % confidence interval over the rotations (``cv_summary.json``).

Why these statistics: a rotation is one draw of the split, so the spread over rotations
is the honest error bar of a result. The standard deviation is the sample one (n - 1),
and the interval is Student's: mean ± t(0.975, n - 1) · std / √n, which stays honest for
the 3 to 5 rotations a protocol has. One rotation has neither (null). A class with no
image in a rotation's split has no per-class figure there: its statistics use the
rotations that have it (their count is ``n``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from cdft_core.text import text_table

CONFIDENCE = 0.95
SPLITS = ("test", "val")
PER_CLASS = ("precision", "recall", "f1")


def rotation_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """A run's ``summary.json`` as flat metrics: ``test/accuracy``, ``test/recall[DC]``, ``val/...``."""
    from cdft_core.training.metrics import SCALARS

    out: dict[str, float] = {}
    for split in SPLITS:
        metrics = summary[split]
        out.update({f"{split}/{name}": float(metrics[name]) for name in SCALARS if metrics.get(name) is not None})
        for cls, figures in (metrics.get("per_class") or {}).items():
            if figures.get("present"):
                out.update({f"{split}/{part}[{cls}]": float(figures[part]) for part in PER_CLASS})
    return out


def describe(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """n, mean, sample standard deviation and the Student-t confidence interval of ``values``."""
    from scipy import stats

    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci95": None}
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def cv_summary(header: Mapping[str, Any], rotations: Sequence[Mapping[str, Any]],
               summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``cv_summary.json``: ``header`` (parent, dataset, protocol...), then each rotation
    (its folds, best epoch, images and metrics, from its run's ``summary.json``), then the
    statistics of every metric over the rotations."""
    per_rotation = []
    for rotation, summary in zip(rotations, summaries, strict=True):
        per_rotation.append({**rotation, "best_stage": summary["best_stage"], "best_epoch": summary["best_epoch"],
                             "images": summary["images"], "metrics": rotation_metrics(summary)})
    names = list(dict.fromkeys(name for r in per_rotation for name in r["metrics"]))
    statistics = {name: describe([r["metrics"][name] for r in per_rotation if name in r["metrics"]])
                  for name in names}
    first = summaries[0] if summaries else {}
    return {
        "status": "complete",
        **header,
        "classes": first.get("classes"),
        "statistics": {"std": "sample standard deviation (n - 1)",
                       "ci95": "mean ± t(0.975, n - 1) · std / sqrt(n), Student's t over the rotations"},
        "rotations": per_rotation,
        "metrics": statistics,
    }


def cv_table(summary: Mapping[str, Any]) -> str:
    """The metric table ``cdft cv`` prints: one column per rotation, then mean, std and 95 % CI."""
    rotations = summary["rotations"]
    headers = ["metric", *(f"rotation {r['rotation']}" for r in rotations), "mean", "std", "95% CI"]
    rows = []
    for name, stats in summary["metrics"].items():
        cells = [_number(r["metrics"].get(name), absent="absent") for r in rotations]
        ci = stats["ci95"]
        rows.append([name, *cells, _number(stats["mean"]), _number(stats["std"]),
                     f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "-"])
    return text_table(rows, headers, numeric=True)


def _number(value: float | None, absent: str = "-") -> str:
    return absent if value is None else f"{value:.4f}"
