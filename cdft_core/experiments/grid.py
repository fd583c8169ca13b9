"""``cdft grid``: a YAML grid of experiments, its cells, and the command line of each.

Why a file of lists rather than a loop in a shell script: the cells get stable names and
directories, so a grid can be listed (``--dry-run``), handed to a scheduler one command
per line (``--print-commands``) and resumed, and a typo in it fails before anything runs.

The file (``configs/grids/paper.yaml`` is the paper's)::

    command: cv                 # each cell is a `cdft cv` (default) or a single `cdft run`
    output: runs/paper          # the cells' directories: <output>/<cell name>
    rotations: [0, 1]           # cv only: these rotations (default: all)
    epochs: 100                 # a single value: a setting every cell shares (any `cdft run` option)
    backbone: [a, b]            # a list: one axis of the grid; the cells are the product of the axes
    dataset:                    # an entry may be a mapping: options that go together, named by the axis' own
      - {dataset: breakhis, data_root: data/BreaKHis_v1, split_file: breakhis.csv}
    exclude:                    # cells to leave out: every key of an entry matches (a list: any of its values)
      - {dataset: hcrf, backbone: b}

Any ``cdft run`` option may be a setting or an axis (``config`` too: a preset under the
cell's options), and so may the launcher options (``nproc_per_node``...). Cells are
numbered from 0 in product order, the first axis outermost; a cell's name joins its axes'
values (numbers with their key: ``seed2``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from cdft_core.config import FIELD_NAMES, RESUME_OVERRIDES, RunConfig, absolute_paths, merge, validate
from cdft_core.errors import CdftError, UsageError
from cdft_core.experiments.commands import DICT_FLAGS, option_args
from cdft_core.text import one_line
from cdft_core.yaml_files import load_yaml

COMMANDS = ("cv", "run")
#: what a finished cell leaves in its directory, per command
DONE_MARKER = {"cv": "cv_summary.json", "run": "summary.json"}
#: the keys of the grid itself (the others are run options)
GRID_KEYS = ("command", "output", "rotations", "exclude")


def _launch_fields() -> tuple[str, ...]:
    from cdft_core.training.launch import LaunchOptions

    return tuple(f.name for f in dataclasses.fields(LaunchOptions))


@dataclass(frozen=True)
class Cell:
    """One experiment of the grid: its number, its name (its directory) and its options."""

    index: int
    name: str
    values: dict[str, Any]  # run options (config keys, ``config``, launcher options), in the file's order
    labels: dict[str, str]  # axis -> the label of this cell's value on it


@dataclass(frozen=True)
class Grid:
    """A grid file read and checked: its cells (exclusions applied) and where they go."""

    source: str
    command: str
    output: str
    rotations: list[int] | None
    axes: list[str]
    cells: list[Cell]
    excluded: int


def load_grid(path: str, *, output: str | None = None) -> Grid:
    """Read and check ``path``; ``output`` (``--output``) overrides the file's. Errors are
    usage errors naming the file and the key (or the cell) at fault."""
    data = load_yaml(path)
    source = one_line(path, 120)
    command = str(data.get("command", "cv"))
    if command not in COMMANDS:
        raise UsageError(f"{source}: command must be cv or run, got {command!r}")
    run_keys = (*FIELD_NAMES, "config", *_launch_fields())
    for key in data:
        if key not in GRID_KEYS and key not in run_keys:
            close = difflib.get_close_matches(str(key), [*GRID_KEYS, *run_keys], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; a grid takes `cdft run` options and " + ", ".join(GRID_KEYS)
            raise UsageError(f"{source}: unknown key {str(key)!r}{hint}")
    if command == "cv":
        folds = [k for k in ("val_fold", "test_fold") if k in data]
        if folds:
            raise UsageError(f"{source}: {', '.join(folds)} is chosen by each rotation of a cv cell; drop it "
                             f"(or use rotations:, or command: run)")
    elif data.get("rotations") is not None:
        raise UsageError(f"{source}: rotations apply to command: cv only")
    settings = {k: v for k, v in data.items() if k not in GRID_KEYS}
    axes = [k for k, v in settings.items() if isinstance(v, list)]
    for axis in axes:
        if not settings[axis]:
            raise UsageError(f"{source}: {axis} lists no value; give at least one (or a single value)")
    cells, excluded = _cells(source, settings, axes, data.get("exclude") or [], run_keys)
    return Grid(source=str(path), command=command, output=str(output or data.get("output") or _default_output(path)),
                rotations=_rotations(source, data.get("rotations")), axes=axes, cells=cells, excluded=excluded)


def _default_output(path: str) -> str:
    """``runs/<grid file name without .yaml>``."""
    return "runs/" + PurePosixPath(str(path).replace("\\", "/")).stem


def _rotations(source: str, value: Any) -> list[int] | None:
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
    try:
        chosen = [int(item) for item in items if str(item).strip()]
    except (TypeError, ValueError):
        raise UsageError(f"{source}: rotations must be rotation numbers (0, 1, ...), got {value!r}") from None
    if not chosen or len(set(chosen)) != len(chosen) or min(chosen) < 0:
        raise UsageError(f"{source}: rotations must name distinct rotation numbers (0, 1, ...), got {value!r}")
    return chosen


#: the most cells one grid file may hold (the paper's grid has 48)
MAX_CELLS = 10_000


def _cells(source: str, settings: Mapping[str, Any], axes: Sequence[str], exclude: Any,
           run_keys: Sequence[str]) -> tuple[list[Cell], int]:
    """The product of the axes, minus the excluded cells, each checked and named."""
    if not isinstance(exclude, list) or not all(isinstance(e, Mapping) for e in exclude):
        raise UsageError(f"{source}: exclude must be a list of mappings such as {{dataset: hcrf, backbone: NAME}}")
    for entry in exclude:
        unknown = [k for k in entry if k not in run_keys]
        if unknown:
            raise UsageError(f"{source}: exclude entry {_shown(entry)} names unknown keys {unknown}")
    count = math.prod(len(settings[axis]) for axis in axes)
    if count > MAX_CELLS:  # before any cell is built: a few long lists multiply into billions
        raise UsageError(f"{source}: the grid has {count:,} cells ({' x '.join(str(len(settings[a])) for a in axes)}), "
                         f"more than {MAX_CELLS:,}; split it into several grid files or shorten its lists")
    combos = list(itertools.product(*(range(len(settings[axis])) for axis in axes)))
    used = [False] * len(exclude)
    cells: list[Cell] = []
    for combo in combos:
        values, labels = _cell_values(source, settings, dict(zip(axes, combo, strict=True)), run_keys)
        hits = [i for i, entry in enumerate(exclude) if all(_matches(values.get(k), v) for k, v in entry.items())]
        for i in hits:
            used[i] = True
        if not hits:
            name = "-".join(_safe(label) for label in labels.values()) or "cell"
            cells.append(Cell(len(cells), name, values, labels))
    unused = [_shown(entry) for entry, hit in zip(exclude, used, strict=True) if not hit]
    if unused:
        raise UsageError(f"{source}: exclude entry {unused[0]} matches no cell; check its keys and values")
    names = [c.name for c in cells]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"{source}: two cells would share the directory {twice[0]!r}; make the axes' values distinct")
    return [_typed(source, cell) for cell in cells], len(combos) - len(cells)


def _cell_values(source: str, settings: Mapping[str, Any], choice: Mapping[str, int],
                 run_keys: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """One cell's options in the file's order (a mapping entry expands in place) and its axis labels."""
    values: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for key, value in settings.items():
        if key not in choice:
            _put(source, values, key, value, key)
            continue
        entry = value[choice[key]]
        if isinstance(entry, Mapping) and key not in DICT_FLAGS:
            if key not in entry:
                raise UsageError(f"{source}: the {key} entry {_shown(entry)} must set {key} itself (it names the cell)")
            unknown = [k for k in entry if k not in run_keys]
            if unknown:
                raise UsageError(f"{source}: the {key} entry {_shown(entry)} sets unknown options {unknown}")
            for inner, item in entry.items():
                _put(source, values, inner, item, key)
            labels[key] = _label(key, entry[key])
        else:
            _put(source, values, key, entry, key)
            labels[key] = _label(key, entry)
    return values, labels


def _put(source: str, values: dict[str, Any], key: str, value: Any, where: str) -> None:
    if key in values:
        raise UsageError(f"{source}: {key} is set twice for one cell (again by the {where} axis); set it in one place")
    if isinstance(value, list):
        raise UsageError(f"{source}: {key} inside an entry of the {where} axis is a list; an axis is a top-level list")
    values[key] = value


def _label(key: str, value: Any) -> str:
    """A name (dataset, backbone...) as it is, a preset by its file name, anything else after its key."""
    if key == "config":
        return PurePosixPath(str(value)).stem
    if isinstance(value, bool):
        return key if value else f"no_{key}"
    if value is None:  # an option left unset (e.g. ema: [0.999, null]): off
        return f"no_{key}"
    if isinstance(value, Mapping):
        return "_".join(f"{k}={v}" for k, v in value.items())
    return str(value) if key in _NAME_FIELDS else f"{key}{value}"


#: options whose values are names, shown as they are in a cell's name
_NAME_FIELDS = {f.name for f in dataclasses.fields(RunConfig) if str(f.type).startswith("str")}


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+]+", "_", text).strip("_") or "x"


def _matches(value: Any, wanted: Any) -> bool:
    options = wanted if isinstance(wanted, list) else [wanted]
    return any(_norm(value) == _norm(option) for option in options)


def _norm(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str) if isinstance(value, Mapping) else str(value)


def _shown(value: Any) -> str:
    return one_line(json.dumps(value, default=str), 100)


def _typed(source: str, cell: Cell) -> Cell:
    """The cell with its options checked and converted as ``cdft run`` reads them (``"false"``
    -> False, ``1e-4`` -> 0.0001), so its command line spells them right, and its values
    checked as ``cdft run`` checks them (``epochs: 0`` fails here, not in every cell). Names
    and paths are checked where the cell runs: the machine that lists a grid may not hold the data."""
    where = f"{source}: cell {cell.index} ({cell.name})"
    preset = cell.values.get("config")
    fields = {k: v for k, v in cell.values.items() if k in FIELD_NAMES}
    base = merge(RunConfig(), load_yaml(str(preset)), source=str(preset)) if preset else RunConfig()
    check_settings(merge(base, fields, source=where), where)  # the cell as it will run: its preset under its options
    typed = merge(RunConfig(), fields, source=where)  # its own options alone, converted
    launch = {k: v for k, v in cell.values.items() if k in _launch_fields()}
    if launch:
        from cdft_core.training.launch import LaunchOptions, WorkerCommand, torchrun_argv

        try:
            options = LaunchOptions(**{k: int(v) if k == "node_rank" else str(v) for k, v in launch.items()})
        except ValueError:
            raise UsageError(f"{where}: node_rank must be a number, got {launch['node_rank']!r}") from None
        torchrun_argv(options, WorkerCommand("cdft_cli", ()))  # its checks of the launcher options
    values = {k: getattr(typed, k) if k in fields else v for k, v in cell.values.items()}
    return dataclasses.replace(cell, values=values)


def check_settings(config: RunConfig, where: str | None = None) -> None:
    """:func:`cdft_core.config.validate` on ``config``'s values alone, before its data exist (a
    grid listed on a login node, the demo before it writes its images); the run still checks
    names and paths. A failure is one usage line, prefixed with ``where``."""
    try:
        validate(config, values_only=True)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}" if where else str(exc)) from None


# -- commands and states ------------------------------------------------------------------
def cell_dir(grid: Grid, cell: Cell) -> str:
    """The cell's directory: ``<output>/<cell name>`` (a local path or URL)."""
    return f"{grid.output.rstrip('/')}/{cell.name}"


def cell_args(grid: Grid, cell: Cell) -> list[str]:
    """The cell's self-contained ``cdft`` arguments (``cv --dataset ... --output DIR``)."""
    args = [grid.command, *option_args(cell.values), "--output", cell_dir(grid, cell)]
    if grid.command == "cv" and grid.rotations is not None:
        args += ["--rotations", ",".join(str(r) for r in grid.rotations)]
    return args


def resume_args(grid: Grid, cell: Cell) -> list[str]:
    """The arguments that continue a started cell: its directory and its launcher options
    (``--nproc-per-node``...), so a multi-GPU cell resumes on as many processes as it started on
    (the rest of its configuration is read back from the cell's ``config.yaml``)."""
    launch = {k: v for k, v in cell.values.items() if k in _launch_fields()}
    return [grid.command, "--resume", cell_dir(grid, cell), *option_args(launch)]


def cell_state(grid: Grid, cell: Cell) -> str:
    """``done`` (its summary exists), ``started`` (its configuration exists), ``new``, or
    ``changed`` (see :func:`cell_status`)."""
    return cell_status(grid, cell)[0]


def cell_status(grid: Grid, cell: Cell) -> tuple[str, list[str]]:
    """The cell's state and, when it is ``changed``, what differs (``lr: 1e+30 -> 0.0001``).

    Why: resuming or skipping a cell goes by its directory, whose ``config.yaml`` a resume
    reads back; a cell edited in the grid file since it started would otherwise rerun (or
    keep) its old settings without a word. ``changed`` is a cell whose saved configuration
    (a cv cell's parent's) no longer matches the one the grid file now asks for."""
    from cdft_core.training.rundir import RunDir

    rundir = RunDir(cell_dir(grid, cell))
    done = rundir.exists(DONE_MARKER[grid.command])
    if not rundir.exists("config.yaml"):
        return ("done" if done else "new"), []
    changes = config_changes(grid, cell, rundir.join("config.yaml"))
    if changes:
        return "changed", changes
    return ("done" if done else "started"), []


#: keys that may differ between a cell's saved configuration and the grid's: those a resumed
#: run may change, and where the directory is (the grid names it; runs_dir is unused then)
_UNCOMPARED = (*RESUME_OVERRIDES, "output", "runs_dir")


def config_changes(grid: Grid, cell: Cell, saved_path: str) -> list[str]:
    """``key: saved -> wanted`` for each key that changes what is computed, in field order.

    Both sides are settled as a run settles its configuration before saving it, and only
    keys the saved file records are compared (cdft records them all). A saved file that
    cannot be read is left to the resume (or the skip) to meet, as before."""
    try:
        raw = load_yaml(saved_path)
        recorded = {str(k).replace("-", "_") for k in raw}
        saved = _settled(merge(RunConfig(), raw, source=saved_path))
    except CdftError:
        return []
    preset = cell.values.get("config")
    fields = {k: v for k, v in cell.values.items() if k in FIELD_NAMES}
    base = merge(RunConfig(), load_yaml(str(preset)), source=str(preset)) if preset else RunConfig()
    wanted = _settled(merge(base, fields, source=f"{grid.source}: cell {cell.index} ({cell.name})"))
    return [f"{key}: {_brief(getattr(saved, key))} -> {_brief(getattr(wanted, key))}" for key in FIELD_NAMES
            if key in recorded and key not in _UNCOMPARED and getattr(saved, key) != getattr(wanted, key)]


def _settled(config: RunConfig) -> RunConfig:
    """``config`` as a run saves it: paths absolute, the strategy's default adapter named,
    the dataset's options with their defaults and its split file's record. A name that does
    not resolve is left as given: the cell's own run reports it in its own words."""
    config = absolute_paths(config)
    settled: dict[str, Any] = {}
    with contextlib.suppress(Exception):  # any failure here is the run's to report
        if config.adapter is None:
            settled["adapter"] = _default_adapter(config)
    with contextlib.suppress(Exception):
        settled["dataset_options"] = _dataset_options(config)
    return dataclasses.replace(config, **settled)


def _default_adapter(config: RunConfig) -> str:
    """The adapter a run names when none is given: its strategy's default (the registered
    one when the strategy refuses these options, so only the options show as changed)."""
    from cdft_core.registry import get_registry
    from cdft_core.strategy import build_strategy

    try:
        return build_strategy(config.strategy, config.strategy_options).default_adapter
    except CdftError:
        return str(dict(get_registry().get("strategy", config.strategy).metadata)["default_adapter"])


def _dataset_options(config: RunConfig) -> dict[str, str]:
    """The dataset options a run records (as :func:`cdft_core.data.splits.load_splits` settles them)."""
    from cdft_core.data.options import build_dataset

    _, resolved = build_dataset(str(config.dataset), config.dataset_options)
    if config.split_file:
        from cdft_core.data.splits import agree_with_split_file
        from cdft_core.data.tables import read_split_file

        _, agreed = agree_with_split_file(read_split_file(config.split_file), config.split_file,
                                          str(config.dataset), config.dataset_options, resolved)
        if agreed != resolved:
            _, resolved = build_dataset(str(config.dataset), agreed)
    return resolved


def _brief(value: Any) -> str:
    """A value as a change shows it: ``1e+30``, ``0.0001``, ``null``, ``{"task": "binary"}``."""
    if value is None or isinstance(value, (bool, Mapping)):
        return one_line(json.dumps(value, sort_keys=True, default=str), 60)
    return one_line(str(value), 60)
