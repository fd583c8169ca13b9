"""Find every run under some directories — single runs, ``cdft cv`` parents, ``cdft grid``
outputs, in any mix and at any depth — and read what each left behind.

Why "complete" is decided here and nowhere else: a run is complete when its
``summary.json`` exists (the engine writes it last), and only complete runs may reach a
table or a figure. Everything else — a rotation still training, one that never started, a
summary that cannot be read — becomes an :class:`Incomplete` entry with its reason, so the
report lists it instead of averaging a partial result in or dropping it without a word.

A cross-validation parent (``cv.json``) contributes the rotations its plan chose; each is
read as a run of its own, so a parent with some rotations done reports those (with their
n, marked partial) and lists the others; a complete rotation folder the plan did not
select is listed as excluded, never averaged in. A directory is read once however it is
reached (a rotation named directly and through its parent, a grid and one of its cells),
and report directories
(marked by :data:`REPORT_MARKER`) are never searched.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cdft_core.errors import CdftError
from cdft_core.text import one_line

#: what ``cdft cv`` writes last in a parent; see :mod:`cdft_core.experiments.cv`
CV_SUMMARY = "cv_summary.json"
#: the file that marks a directory as a ``cdft report`` output (never searched, may be rewritten)
REPORT_MARKER = ".cdft-report"
#: folders inside a run that never hold runs: not worth walking
_NOT_RUNS = {"tensorboard", "resume", "__pycache__"}


@dataclass(frozen=True)
class Run:
    """A complete run: its resolved configuration, its summary, and where it sits (its cv parent and rotation)."""

    path: str
    config: Mapping[str, Any]
    summary: Mapping[str, Any]
    parent: str | None = None
    rotation: int | None = None
    #: why the configuration could not be read (None when it was): such a run is never grouped with others
    config_problem: str | None = None
    #: a cv rotation: how many rotations its parent chose, and how many of those are complete
    cv_chosen: int | None = None
    cv_complete: int | None = None
    #: how many processes trained it (it multiplies the effective batch); None: the run does not say
    processes: int | None = None
    #: SHA-256 of the rows it trained on (``RUN/split.csv``); None for a run without the copy
    split_digest: str | None = None

    @property
    def partial(self) -> bool:
        """A rotation of a cross-validation of which only some chosen rotations are complete."""
        return self.cv_chosen is not None and (self.cv_complete or 0) < self.cv_chosen

    @property
    def dataset(self) -> str:
        return str(self.summary.get("dataset") or self.config.get("dataset") or "?")

    @property
    def backbone(self) -> str:
        return str(self.summary.get("backbone") or self.config.get("backbone") or "?")

    @property
    def strategy(self) -> str:
        return str(self.summary.get("strategy") or self.config.get("strategy") or "?")

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.summary.get("classes") or []]

    @property
    def pair_key(self) -> tuple[Any, ...]:
        """What makes two runs comparable image for image: the same split rows (the digest of
        the split they trained on, else their split file's name), protocol, folds and seed. A
        run whose configuration does not say its folds pairs with nothing.

        Why the split: the same folds of two different split files (another ``--seed`` of
        ``cdft prepare``) are other images; such runs are neither pairs nor duplicates."""
        folds = (self.config.get("val_fold"), self.config.get("test_fold"))
        if None in folds:
            return ("unpaired", self.path)
        seed = self.summary.get("seed", self.config.get("seed"))
        split = self.split_digest or ("file", self.config.get("split_file"))
        return (split, self.summary.get("protocol"), *folds, seed)

    def stage_dir(self) -> str:
        """The final stage's folder, where the run's final model left its files.

        The summary's ``checkpoint`` is the final stage's best weights (``stage2-full/best.safetensors``),
        so its folder is the one whose predictions describe the reported metrics.
        """
        checkpoint = self.summary.get("checkpoint") or ""
        if not checkpoint and self.summary.get("stages"):
            checkpoint = self.summary["stages"][-1].get("checkpoint") or ""
        return os.path.join(self.path, os.path.dirname(str(checkpoint)))

    def predictions_path(self) -> str | None:
        """The final stage's ``predictions.csv``, or None for a run written before it existed."""
        path = os.path.join(self.stage_dir(), "predictions.csv")
        return path if os.path.isfile(path) else None

    def metric_lines(self) -> list[dict[str, Any]]:
        """``metrics.jsonl`` (empty when missing); a damaged line is skipped, not fatal."""
        return read_metric_lines(self.path)


@dataclass(frozen=True)
class Incomplete:
    """A run the report leaves out of every number and figure, and says why."""

    path: str
    reason: str
    parent: str | None = None


@dataclass(frozen=True)
class CvParent:
    """A cross-validation parent: how many of its chosen rotations are complete."""

    path: str
    chosen: int
    complete: int
    summarised: bool  # cv_summary.json exists (written when every chosen rotation was done)


@dataclass
class Collection:
    """Everything found: complete runs, incomplete ones, the cv parents, where the search ran."""

    sources: list[str]
    runs: list[Run] = field(default_factory=list)
    incomplete: list[Incomplete] = field(default_factory=list)
    parents: list[CvParent] = field(default_factory=list)


def collect(paths: Iterable[str]) -> Collection:
    """Search ``paths`` recursively and read every run and cv parent found (each once)."""
    sources = [str(p) for p in paths]
    found: dict[str, Run | Incomplete] = {}
    parents: dict[str, CvParent] = {}
    for source in sources:
        for directory in _run_directories(source):
            key = os.path.realpath(directory)
            if os.path.isfile(os.path.join(directory, "cv.json")):
                parent, children = _read_cv(directory)
                parents[key] = parent
                found.update({os.path.realpath(child.path): child for child in children})
            elif key not in found:  # a rotation already read through its parent keeps its parent
                found[key] = read_run(directory)
    ordered = sorted(found.values(), key=lambda r: r.path)
    return Collection(
        sources=sources,
        runs=[r for r in ordered if isinstance(r, Run)],
        incomplete=[r for r in ordered if isinstance(r, Incomplete)],
        parents=sorted(parents.values(), key=lambda p: p.path),
    )


def _run_directories(source: str) -> list[str]:
    """The run and cv-parent directories under ``source`` (itself included), in sorted order.

    A run or parent is not searched further (its stage folders hold no runs; a parent's
    rotations are read through its plan), nor is a report directory or a hidden folder.
    """
    from cdft_core.training.rundir import RUN_MARKERS

    out: list[str] = []
    for directory, folders, files in os.walk(source):
        names = set(files)
        if REPORT_MARKER in names:
            folders[:] = []
        elif "cv.json" in names or names & set(RUN_MARKERS):
            out.append(directory)
            folders[:] = []
        else:
            folders[:] = sorted(f for f in folders if not f.startswith(".") and f not in _NOT_RUNS)
    return out


def read_run(path: str, parent: str | None = None, rotation: int | None = None) -> Run | Incomplete:
    """One run directory: a :class:`Run` when its summary says complete, else why not."""
    summary_path = os.path.join(path, "summary.json")
    if not os.path.isfile(summary_path):
        return Incomplete(path, f"not finished: no summary.json ({_progress(path)})", parent)
    try:
        with open(summary_path, encoding="utf-8") as handle:
            summary = json.load(handle)
    except (OSError, ValueError, RecursionError) as exc:
        return Incomplete(path, f"summary.json cannot be read ({one_line(exc, 120)})", parent)
    if not isinstance(summary, dict) or summary.get("status") != "complete":
        return Incomplete(path, "summary.json does not say the run is complete", parent)
    missing = [split for split in ("test", "val") if not isinstance(summary.get(split), dict)]
    if missing:
        return Incomplete(path, f"summary.json has no {' or '.join(missing)} metrics", parent)
    config, problem = _read_config(path)
    return Run(path=path, config=config, summary=summary, parent=parent, rotation=rotation, config_problem=problem,
               processes=_processes(path, summary), split_digest=_split_digest(path))


def _split_digest(path: str) -> str | None:
    """SHA-256 of the run's own ``split.csv`` (read in chunks), or None when it has none."""
    import hashlib

    from cdft_core.training.rundir import RUN_SPLIT

    digest = hashlib.sha256()
    try:
        with open(os.path.join(path, RUN_SPLIT), "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def _read_cv(path: str) -> tuple[CvParent, list[Run | Incomplete]]:
    """A cv parent's chosen rotations, each read as a run; a rotation not started is incomplete."""
    try:
        with open(os.path.join(path, "cv.json"), encoding="utf-8") as handle:
            plan = json.load(handle)
        selected = plan.get("selected")
        rotations = [r for r in plan["rotations"] if selected is None or r["rotation"] in selected]
        others = [r for r in plan["rotations"] if r not in rotations]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return CvParent(path, 0, 0, False), [Incomplete(path, f"cv.json cannot be read ({one_line(exc, 120)})")]
    children: list[Run | Incomplete] = []
    for rotation in rotations:
        child = os.path.join(path, str(rotation.get("run_dir") or f"rotation-{rotation['rotation']}"))
        if os.path.isdir(child):
            children.append(read_run(child, parent=path, rotation=int(rotation["rotation"])))
        else:
            children.append(Incomplete(child, "not started", path))
    complete = sum(isinstance(c, Run) for c in children)
    children = [dataclasses.replace(c, cv_chosen=len(rotations), cv_complete=complete) if isinstance(c, Run) else c
                for c in children]
    children += _excluded(path, children, others, selected)
    summarised = os.path.isfile(os.path.join(path, CV_SUMMARY))
    return CvParent(path, len(rotations), complete, summarised), children


def _excluded(path: str, chosen: list[Run | Incomplete], others: list[Mapping[str, Any]],
              selected: Any) -> list[Incomplete]:
    """Complete runs inside a cv parent that its plan did not choose (a rotation left out of
    ``selected``, a folder not in the plan): listed with why, never averaged in."""
    taken = {os.path.realpath(c.path) for c in chosen}
    named = {str(r.get("run_dir") or f"rotation-{r['rotation']}"): r["rotation"] for r in others}
    out: list[Incomplete] = []
    try:
        folders = sorted(os.listdir(path))
    except OSError:
        return out
    for folder in folders:
        child = os.path.join(path, folder)
        if os.path.realpath(child) in taken or not os.path.isfile(os.path.join(child, "summary.json")):
            continue
        if not isinstance(read_run(child, parent=path), Run):
            continue
        if folder in named:
            why = (f"excluded: complete, but rotation {named[folder]} is not among cv.json's selected rotations "
                   f"({', '.join(str(s) for s in selected or [])})")
        else:
            why = "excluded: complete, but not a rotation of cv.json's plan"
        out.append(Incomplete(child, why, path))
    return out


def _read_config(path: str) -> tuple[dict[str, Any], str | None]:
    """The run's ``config.yaml`` (safe, bounded YAML) and None; empty and the reason when it is
    missing or unreadable — the summary alone still names the dataset, backbone and strategy, but
    nothing says how the run was set up, so it is not grouped with other runs."""
    from cdft_core.yaml_files import load_yaml

    config_path = os.path.join(path, "config.yaml")
    if not os.path.isfile(config_path):
        return {}, "no config.yaml"
    try:
        config = load_yaml(config_path)
    except CdftError as exc:
        return {}, f"config.yaml cannot be read ({one_line(exc, 120)})"
    if not isinstance(config, dict):
        return {}, "config.yaml is not a mapping"
    return config, None


def _processes(path: str, summary: Mapping[str, Any]) -> int | None:
    """The run's number of processes: ``summary.json``'s ``world_size``, else (a run written before
    the summary recorded it) ``environment.json``'s, written when the run was created; None when neither says."""
    value = summary.get("world_size")
    if value is None:
        try:
            with open(os.path.join(path, "environment.json"), encoding="utf-8") as handle:
                environment = json.load(handle)
        except (OSError, ValueError):
            return None
        value = environment.get("world_size") if isinstance(environment, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def read_metric_lines(path: str) -> list[dict[str, Any]]:
    """The lines of ``PATH/metrics.jsonl`` that parse as JSON objects."""
    lines: list[dict[str, Any]] = []
    try:
        with open(os.path.join(path, "metrics.jsonl"), encoding="utf-8") as handle:
            for text in handle:
                try:
                    line = json.loads(text)
                except ValueError:
                    continue
                if isinstance(line, dict):
                    lines.append(line)
    except OSError:
        return []
    return lines


def _progress(path: str) -> str:
    """How far an unfinished run got, from its last metric line: ``last logged: stage frt, epoch 2``."""
    lines = read_metric_lines(path)
    if not lines:
        return "nothing logged yet"
    last = lines[-1]
    return f"last logged: stage {last.get('stage', '?')}, epoch {last.get('epoch', '?')}"
