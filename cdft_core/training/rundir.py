"""The run directory: its name, its creation (never over a previous run), and file I/O.

A run directory is a local path or an fsspec URL (``s3://bucket/runs/x``, ``memory://x``);
everything the engine writes goes through :class:`RunDir`, so both work the same. Small
files are rewritten whole (atomically: a temporary file, then a rename; see
:mod:`cdft_core.files`), which is also what makes a run killed at any moment resumable.

Layout::

    RUN/config.yaml            resolved configuration (``cdft run --config RUN/config.yaml`` repeats it)
    RUN/environment.json       package versions, command line, git commit, world size
    RUN/split.csv              the split table the run trained on (``cdft eval`` evaluates it)
    RUN/metrics.jsonl          one line per stage, epoch and split
    RUN/train.log              the log lines of rank 0
    RUN/tensorboard/           TensorBoard event files
    RUN/<stage>/best.safetensors, best.json, confusion_matrix.csv   per stage
    RUN/resume/                the latest resumable state (model, optimizer, schedule, RNG)
    RUN/summary.json           written last, only by a complete run
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Mapping
from typing import Any

from cdft_core.errors import CdftError, UsageError
from cdft_core.files import atomic_write, existing_ancestor, unwritable_reason
from cdft_core.text import one_line

#: files whose presence means "this directory holds a run"
RUN_MARKERS = ("config.yaml", "summary.json", "metrics.jsonl")
#: the plan of a ``cdft cv`` parent directory (its runs are the rotation-N folders inside)
CV_PLAN = "cv.json"
#: the run's own copy of the split table it trained on (:func:`write_run_split`)
RUN_SPLIT = "split.csv"


class RunDir:
    """A directory given as a local path or fsspec URL, with whole-file reads and writes."""

    def __init__(self, url: str) -> None:
        import fsspec

        self.url = url.rstrip("/") if url not in ("/",) else url
        self.fs, self.path = fsspec.core.url_to_fs(self.url)
        self.is_local = type(self.fs).__name__ == "LocalFileSystem"

    def __repr__(self) -> str:
        return f"RunDir({self.url!r})"

    def join(self, *parts: str) -> str:
        """The URL (or local path) of a file inside the directory."""
        return "/".join([self.url, *parts]) if not self.is_local else os.path.join(self.url, *parts)

    def _inner(self, name: str) -> str:
        return f"{self.path}/{name}" if name else self.path

    def exists(self, name: str = "") -> bool:
        return self.fs.exists(self._inner(name))

    def makedirs(self, name: str = "") -> None:
        self.fs.makedirs(self._inner(name), exist_ok=True)

    def listdir(self, name: str = "") -> list[str]:
        """Base names in a sub-directory ([] when it does not exist)."""
        inner = self._inner(name)
        if not self.fs.exists(inner):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(inner, detail=False))

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open(self._inner(name), "rb") as handle:
            return handle.read()

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a whole file; on local disks atomically (readers never see half a file)."""
        atomic_write(self.join(name), data, what="run file", make_parents=True)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def remove(self, name: str) -> None:
        inner = self._inner(name)
        if self.fs.exists(inner):
            self.fs.rm(inner, recursive=True)


def auto_name(dataset: str, backbone: str, strategy: str, val_fold: int, test_fold: int, seed: int,
              when: float | None = None) -> str:
    """``<dataset>-<backbone>-<strategy>-v<val>t<test>-s<seed>-<YYYYmmdd-HHMMSS>``, filesystem-safe."""
    parts = [dataset, backbone, strategy, f"v{val_fold}t{test_fold}", f"s{seed}"]
    return "-".join([*(safe_part(p) for p in parts), time_stamp(when)])


def safe_part(text: str) -> str:
    """One part of an automatic name: anything but letters, digits, ``_`` and ``.`` becomes
    ``_``, so the ``-`` between parts stays unambiguous."""
    return re.sub(r"[^A-Za-z0-9_.]+", "_", str(text)).strip("_") or "x"


def time_stamp(when: float | None = None) -> str:
    """``YYYYmmdd-HHMMSS`` in local time (the last part of an automatic name, kept as is)."""
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(when if when is not None else time.time()))


def holds_run(rundir: RunDir) -> bool:
    """Whether the directory already holds a run's files (results must never be overwritten)."""
    return any(rundir.exists(marker) for marker in RUN_MARKERS)


def check_output(output: str | None, runs_dir: str) -> None:
    """Before any work: ``--output`` must not hold a run and its parent must be writable."""
    target = output if output else runs_dir
    try:
        rundir = RunDir(target)
    except (ValueError, ImportError) as exc:
        raise UsageError(f"output {target!r} cannot be opened: {exc}") from None
    if output:
        if holds_run(rundir):
            cv = rundir.exists(CV_PLAN)
            if rundir.exists("cv_summary.json" if cv else "summary.json"):  # nothing left to continue
                raise UsageError(f"--output {output!r} already holds a complete "
                                 f"{'cross-validation' if cv else 'run'}; choose a new directory")
            raise UsageError(
                f"--output {output!r} already holds a run; choose a new directory, "
                f"or continue that run with `{'cdft cv' if cv else 'cdft run'} --resume {output}`"
            )
        if rundir.exists() and rundir.fs.isfile(rundir.path):
            raise UsageError(f"--output {output!r} is a file, not a directory")
    if rundir.is_local:
        option = "--output" if output else "--runs-dir"
        probe = existing_ancestor(target)
        check_path_length(target, option, probe)
        why = None
        if os.path.isfile(probe):
            why = "is a file"
        elif unwritable_reason(probe):  # a file created there, not permission bits (root passes those)
            why = "does not allow writing"
        if why:
            raise UsageError(f"{option} {one_line(target, 120)!r} is not writable ({probe} {why}); choose another directory")


def check_path_length(path: str, option: str, probe: str | None = None) -> None:
    """Refuse a local path that the filesystem cannot hold: a name longer than its
    NAME_MAX or a whole path reaching PATH_MAX (bytes, as the kernel counts them).

    Checked before anything is created, so a refused path leaves no folders behind.
    """
    absolute = os.path.abspath(path)
    probe = probe or existing_ancestor(absolute)
    try:
        name_max = os.pathconf(probe, "PC_NAME_MAX")
        path_max = os.pathconf(probe, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no answer: the usual limits
        name_max, path_max = 255, 4096
    longest = max(absolute.split(os.sep), key=lambda part: len(os.fsencode(part)))
    if name_max and name_max > 0 and len(os.fsencode(longest)) > name_max:
        raise UsageError(f"{option} has a path component of {len(os.fsencode(longest))} bytes "
                         f"({one_line(longest, 40)!r}); this filesystem allows {name_max}: choose a shorter name")
    if path_max and path_max > 0 and len(os.fsencode(absolute)) >= path_max:
        raise UsageError(f"{option} {one_line(absolute, 60)!r} is {len(os.fsencode(absolute))} bytes long; "
                         f"paths here must be shorter than {path_max} (PATH_MAX): choose a shorter path")


def create_run_dir(output: str | None, runs_dir: str, name: str) -> RunDir:
    """Create the run directory: ``output`` as given, or ``runs_dir/name`` made unique.

    Never reuses a directory that holds a run. An automatically named directory that
    exists already (two runs in the same second) gets a ``-2``, ``-3``... suffix.
    """
    check_output(output, runs_dir)
    if output:
        rundir = RunDir(output)
    else:
        base = RunDir(runs_dir)
        candidate, n = name, 1
        while base.exists(candidate):
            n += 1
            candidate = f"{name}-{n}"
        rundir = RunDir(base.join(candidate))
    created: list[str] = []
    if rundir.is_local:
        check_path_length(rundir.url, "--output" if output else "--runs-dir")
        folder = os.path.abspath(rundir.url)
        while not os.path.exists(folder):  # the folders makedirs will create, deepest first
            created.append(folder)
            folder = os.path.dirname(folder)
    try:
        rundir.makedirs()
        rundir.write_text(".cdft-run", "cdft run directory\n")
    except (OSError, CdftError) as exc:
        _remove_created(created)
        raise CdftError(f"cannot create the run directory {one_line(rundir.url, 120)!r}: {one_line(exc)}") from None
    return rundir


def _remove_created(folders: list[str]) -> None:
    """Undo a failed creation: remove the folders it made (deepest first) and their marker file."""
    for folder in folders:
        with contextlib.suppress(OSError):
            marker = os.path.join(folder, ".cdft-run")
            if os.path.isfile(marker):
                os.unlink(marker)
            os.rmdir(folder)


def open_existing(path: str) -> RunDir:
    """A run directory to resume or evaluate; it must hold ``config.yaml``."""
    shown = one_line(path, 120)
    try:
        rundir = RunDir(path)
    except (ValueError, ImportError) as exc:
        raise UsageError(f"{shown!r} cannot be opened: {one_line(exc)}") from None
    if not rundir.exists():
        raise UsageError(f"run directory {shown!r} does not exist")
    if rundir.exists(CV_PLAN):  # its config.yaml is the rotations' shared one, not a run's
        raise UsageError(f"{shown!r} is a cross-validation directory; continue it with `cdft cv --resume {shown}`, "
                         f"or name one of its rotation-N runs")
    if not rundir.exists("config.yaml"):
        raise UsageError(f"{shown!r} is not a cdft run directory (no config.yaml)")
    return rundir


def write_run_split(rundir: RunDir, splits: Any) -> None:
    """Write the rows a run trains on (``splits``: train, val and test, with their folds and
    columns as loaded, and the dataset options recorded) as ``RUN/split.csv``.

    The configured split file may be edited or deleted later, and an in-memory split
    exists nowhere else: this copy is what makes ``cdft eval`` of the run evaluate the
    very test set its summary reports.
    """
    import pandas as pd

    from cdft_core.data.tables import record_options, write_split_file

    table = pd.concat([splits.train, splits.val, splits.test], ignore_index=True)
    table = table.drop_duplicates("image_path", ignore_index=True)  # a protocol reusing a fold in two parts
    write_split_file(record_options(table, splits.dataset, splits.options), rundir.join(RUN_SPLIT))


def run_split_of(checkpoint: str) -> str | None:
    """``RUN/split.csv`` of the run a model file belongs to (``RUN`` itself or ``RUN/<stage>/x``),
    or None: a run written before the copy existed, or a file outside any run."""
    import posixpath

    rundir = RunDir(checkpoint)
    if not rundir.is_local:
        parent = posixpath.dirname(posixpath.dirname(rundir.url))
    else:
        parent = os.path.dirname(os.path.dirname(os.path.abspath(rundir.url)))
    for candidate in (rundir.url, parent):
        try:
            run = RunDir(candidate)
            if run.fs.isdir(run.path) and run.exists("config.yaml") and run.exists(RUN_SPLIT):
                return run.join(RUN_SPLIT)
        except (OSError, ValueError):
            continue
    return None


def run_plugins(config: Any, spec: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """Each component of a run (dataset, backbone, adapter, strategy) with the plugin and
    distribution that provided it (:meth:`Registry.provenance`), for ``environment.json``
    and every checkpoint's metadata."""
    from cdft_core.registry import get_registry

    registry = get_registry()
    names = {"dataset": config.dataset, "backbone": spec["backbone"], "adapter": spec["adapter"],
             "strategy": config.strategy}
    return {kind: registry.provenance(kind, name) for kind, name in names.items()}


def environment_info(argv: list[str], world_size: int, plugins: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What the run ran on: versions, command line, git commit (when available), host, and
    the plugins its components came from (:func:`run_plugins`)."""
    import platform
    import socket
    import subprocess
    import sys
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for package in ("cdft", "torch", "torchvision", "timm", "open_clip_torch", "numpy", "scikit-learn",
                    "pandas", "safetensors", "tensorboard", "fsspec"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    commit = None
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            commit = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    cuda = None
    try:
        import torch

        if torch.cuda.is_available():
            cuda = {"version": torch.version.cuda, "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    except Exception:  # informational only
        cuda = None
    return {
        "command": argv,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "packages": versions,
        "git_commit": commit,
        "cuda": cuda,
        "world_size": world_size,
        "plugins": dict(plugins or {}),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
