"""The rows of the results table: complete runs grouped by dataset, backbone and strategy,
each run with its metric values and its predictions.

Why a row can carry a *setting*: the rotations of a cv parent and repeated runs of one
(dataset, backbone, strategy) are samples of one result — but only when they were run
the same way. Runs of one triple whose configuration differs in anything that changes
what is measured (learning rate, epochs, dataset options such as the magnification, the
protocol...) would be averaged into a number nobody ran, so they are split into rows
named by what differs (``lr=0.001``). Paths, workers, logging, caches and the device do
not change the measurement and are ignored; folds and seed are what tells samples apart.
The number of training processes is part of the setting (``processes=2``): it multiplies
the effective batch, and it is not in ``config.yaml`` but in ``summary.json``. A run that
does not say it (written before summaries recorded it, with no ``environment.json`` saying
it either) counts as ``processes=unknown``: a value of its own, like any key some runs lack.
A key that only some runs set counts as a value of its own (``default``: the run left it
to the default), and a run whose ``config.yaml`` cannot be read gets a row of its own —
nothing says it was run the same way as the others.

A row holding the rotations of a cross-validation of which only some chosen rotations are
complete is *partial*: still reported, but marked (``partial: 3/5 rotations``).

Why a row counts one run per split and seed (:func:`one_per_split`): a second run of one
split and seed (a cv that repeats rotations of another) measures the same thing again;
counted twice it would grow the n and shrink the spread of a result with no more splits
behind it. The paired comparisons apply the same function, so a row's n and its pairs agree;
the row says how many it left out (``2 duplicate run(s) of one split and seed left out``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cdft_core.reports.collect import Run
from cdft_core.reports.predictions import PREDICTIONS, Predictions, macro_roc_auc, read_predictions

#: the table's columns: a run's scalar metrics (``summary.json``), then the patient-level figures
PATIENT_METRICS = ("patient_recognition_rate", "patient_accuracy")
LABELS = {
    "accuracy": "accuracy", "precision_macro": "macro precision", "recall_macro": "macro recall",
    "f1_macro": "macro F1", "f1_paper": "F1 (paper)", "roc_auc": "ROC-AUC",
    "patient_recognition_rate": "patient recognition rate", "patient_accuracy": "patient accuracy",
}
#: configuration keys that do not change what is measured, or that tell the samples apart
IGNORED = frozenset({
    "data_root", "split_file", "output", "runs_dir", "num_workers", "dist_timeout", "log_every", "tensorboard",
    "cache", "cache_dir", "feature_cache", "eval_batch_size", "grad_checkpointing", "device", "compile",
    "compile_mode", "val_fold", "test_fold", "seed", "dataset", "backbone", "strategy",
})


def metric_names() -> tuple[str, ...]:
    """Every column of the table, in order: the summary's scalars, then the patient-level
    figures (named here too, so runs written before the scalars listed them still show them)."""
    from cdft_core.training.metrics import SCALARS

    return tuple(dict.fromkeys((*SCALARS, *PATIENT_METRICS)))


@dataclass
class Sample:
    """One complete run as a sample of its row: its metric values, and its predictions
    (None with ``no_predictions`` saying why: no ROC curve for it)."""

    run: Run
    values: dict[str, float]
    predictions: Predictions | None
    no_predictions: str | None = None


@dataclass
class Row:
    """One row of the table: a (dataset, backbone, strategy) and its samples."""

    dataset: str
    backbone: str
    strategy: str
    setting: str
    samples: list[Sample] = field(default_factory=list)
    slug: str = ""
    #: what every run of the row was run with (the flat keys that change the measurement), for pairing
    #: rows by value rather than by label; None: the configuration could not be read, it pairs with nothing
    config: dict[str, Any] | None = None
    #: the keys the setting names (those that vary among the runs of the row's dataset, backbone and strategy)
    named: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        text = f"{self.dataset} · {self.backbone} · {self.strategy}"
        return f"{text} ({self.setting})" if self.setting else text

    @property
    def n(self) -> int:
        return len(self.kept)

    @property
    def partial(self) -> str:
        """``partial: 3/5 rotations`` when some of the row's runs are rotations of an unfinished
        cross-validation (one figure per such parent), else ``""``."""
        counts = {s.run.parent: f"{s.run.cv_complete}/{s.run.cv_chosen}" for s in self.kept if s.run.partial}
        return f"partial: {', '.join(counts[p] for p in sorted(counts))} rotations" if counts else ""

    @property
    def kept(self) -> list[Sample]:
        """The samples the row counts: one per split and seed (:func:`one_per_split`)."""
        return one_per_split(self.samples)[0]

    @property
    def duplicates(self) -> int:
        """How many runs repeat a split and seed of another run of the row (left out of every number)."""
        return one_per_split(self.samples)[1]

    def shown(self, key: str) -> str:
        """A setting value as the row's label shows it (``default``: its runs leave the key unset)."""
        return _shown((self.config or {}).get(key, _DEFAULT))

    def values(self, metric: str) -> list[float]:
        """The metric over the samples that have it, one per split and seed (a run without it is not counted in its n)."""
        return [s.values[metric] for s in one_per_split(self.samples, metric)[0]]


def one_per_split(samples: Sequence[Sample], metric: str | None = None) -> tuple[list[Sample], int]:
    """The samples (those that have ``metric``, when given) with one run per split and seed
    (:attr:`~cdft_core.reports.collect.Run.pair_key`), in their order, and how many duplicates
    were left out. The first by path is kept, so the choice does not depend on the order the
    directories were named in."""
    candidates = [s for s in samples if metric is None or metric in s.values]
    first: dict[Any, Sample] = {}
    for s in sorted(candidates, key=lambda s: s.run.path):
        first.setdefault(s.run.pair_key, s)
    kept = [s for s in candidates if first[s.run.pair_key] is s]
    return kept, len(candidates) - len(kept)


def duplicates_note(count: int) -> str:
    """What a row or a comparison says about the duplicates it left out (``""`` for none)."""
    return f"{count} duplicate run(s) of one split and seed left out" if count else ""


def build_rows(runs: Sequence[Run], split: str) -> list[Row]:
    """Group complete runs into rows (sorted by dataset, backbone, strategy, setting), reading each run's values."""
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.dataset, run.backbone, run.strategy), []).append(run)
    rows: dict[tuple[str, str, str, str], Row] = {}
    for (dataset, backbone, strategy), members in groups.items():
        flat = {run.path: _flatten(run) for run in members if not run.config_problem}
        varying = _varying(flat.values())
        for run in members:
            key = (dataset, backbone, strategy, _setting(run, flat, varying))
            row = rows.setdefault(key, Row(*key, config=flat.get(run.path), named=varying))
            row.samples.append(sample(run, split))
    ordered = [rows[key] for key in sorted(rows)]
    used: set[str] = set()
    for row in ordered:
        row.slug = _unique(_slug(f"{row.dataset}-{row.backbone}-{row.strategy}-{row.setting}"), used)
    return ordered


def sample(run: Run, split: str) -> Sample:
    """A run's metric values on ``split`` (the summary's; a missing ROC-AUC from its predictions)."""
    metrics = run.summary[split]
    values = {name: float(metrics[name]) for name in metric_names()
              if isinstance(metrics.get(name), (int, float)) and not isinstance(metrics.get(name), bool)}
    path = run.predictions_path()
    if path is None:
        return Sample(run, values, None, f"no {PREDICTIONS} in {run.stage_dir()}")
    try:
        predictions = read_predictions(path, split, run.classes)
    except (OSError, ValueError) as exc:
        from cdft_core.text import one_line

        return Sample(run, values, None, f"{PREDICTIONS} cannot be used ({one_line(exc, 160)})")
    if "roc_auc" not in values and (auc := macro_roc_auc(predictions)) is not None:
        values["roc_auc"] = auc
    return Sample(run, values, predictions)


_DEFAULT = object()  # a key the run's configuration does not set


def _varying(flats: Iterable[Mapping[str, Any]]) -> tuple[str, ...]:
    """The keys whose values differ among the runs (sorted). Every key any run sets counts: a
    run lacking it has a value of its own (the default)."""
    flats = list(flats)
    keys = set().union(*(set(f) for f in flats))
    return tuple(sorted(k for k in keys if len({_value(f, k) for f in flats}) > 1))


def _setting(run: Run, flat: Mapping[str, Mapping[str, Any]], varying: Sequence[str]) -> str:
    """The run's setting: its values of the ``varying`` keys (``""`` when none vary); a run without
    a readable configuration is set apart by what went wrong and its path."""
    if run.config_problem:
        return f"{run.config_problem}: {run.path}"
    f = flat[run.path]
    return ", ".join(f"{shown_key(k)}={_shown(f.get(k, _DEFAULT))}" for k in varying)


def same_value(first: Mapping[str, Any], second: Mapping[str, Any], key: str) -> bool:
    """Whether two flat configurations agree on ``key`` (unset only equals unset)."""
    return _value(first, key) == _value(second, key)


def _value(flat: Mapping[str, Any], key: str) -> str:
    return "\0default" if key not in flat else json.dumps(flat[key], sort_keys=True, default=str)


def _flatten(run: Run) -> dict[str, Any]:
    """The run's configuration as flat keys (``dataset_options.magnification``), with the
    protocol the run actually used (the configuration may leave it to the dataset) and its
    number of processes."""
    out: dict[str, Any] = {}
    for key, value in run.config.items():
        if key in IGNORED:
            continue
        if isinstance(value, Mapping):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    if run.summary.get("protocol"):
        out["protocol"] = run.summary["protocol"]
    out["processes"] = "unknown" if run.processes is None else run.processes
    return out


def shown_key(key: str) -> str:
    """A flat key as settings show it (``dataset.magnification``)."""
    return key.replace("_options.", ".")


def _shown(value: Any) -> str:
    if value is _DEFAULT:
        return "default"
    return "none" if value is None else str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_-.")[:120] or "row"


def _unique(slug: str, used: set[str]) -> str:
    candidate, index = slug, 2
    while candidate.lower() in used:
        candidate, index = f"{slug}-{index}", index + 1
    used.add(candidate.lower())
    return candidate
