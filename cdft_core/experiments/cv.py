"""``cdft cv``: every rotation of a dataset's fold protocol, as child runs of one parent directory.

Why a parent directory of ordinary runs: each rotation is a complete ``cdft run`` (its
own checkpoints, logs, ``summary.json``, ``cdft eval`` and ``--resume`` work on it), and
the parent only adds the plan and the statistics over the rotations. The rotations are
the protocol's own (:attr:`~cdft_core.data.folds.FoldProtocol.rotations`): for the k-fold
``standard`` protocol rotation r tests on fold r and validates on fold (r+1) mod k; HCRF's
``low-data`` protocol and a plugin's protocol state theirs.

Layout::

    PARENT/config.yaml        the resolved configuration every rotation shares (each sets its own folds)
    PARENT/cv.json            the plan: protocol, folds, each rotation's val and test fold, the rotations chosen
    PARENT/rotation-R/        the run of rotation R (a complete ``cdft run`` directory)
    PARENT/cv_summary.json    written last: every metric per rotation, mean, std and 95 % CI

Resuming (``cdft cv --resume PARENT``): complete rotations (``summary.json``) are skipped,
a started one (``config.yaml``) resumes by ``cdft run --resume``'s rules, the others start.
With launcher options each rotation runs on torchrun's workers as a ``cdft run`` command line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cdft_core.config import RESUME_OVERRIDES, RunConfig, absolute_paths, dump_yaml, merge, resolve_config, validate
from cdft_core.errors import CdftError, UsageError
from cdft_core.experiments.commands import changed_values, flag, option_args
from cdft_core.experiments.cv_summary import cv_summary
from cdft_core.text import one_line
from cdft_core.training.rundir import CV_PLAN, RunDir, check_output, create_run_dir, safe_part, time_stamp
from cdft_core.yaml_files import load_yaml

if TYPE_CHECKING:
    from cdft_core.data.folds import FoldProtocol
    from cdft_core.training.launch import LaunchOptions

CV_SUMMARY = "cv_summary.json"


@dataclass(frozen=True)
class Rotation:
    """One rotation of the protocol: its number and the folds it validates and tests on."""

    index: int
    val_fold: int
    test_fold: int

    @property
    def name(self) -> str:
        """The child run's directory inside the parent."""
        return f"rotation-{self.index}"

    def to_json(self) -> dict[str, Any]:
        return {"rotation": self.index, "val_fold": self.val_fold, "test_fold": self.test_fold, "run_dir": self.name}


@dataclass
class CvPlan:
    """What a cross-validation runs: the shared configuration, every declared rotation,
    the ones chosen, and (once it exists) the parent directory."""

    config: RunConfig
    protocol: str
    folds: list[int]
    rotations: list[Rotation]
    selected: list[int]
    parent: str | None = None
    resume_overrides: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "folds": self.folds, "rotations": [r.to_json() for r in self.rotations],
                "selected": self.selected}


def parse_rotations(text: str | None) -> list[int] | None:
    """``"0,2"`` -> ``[0, 2]`` (``--rotations``); None: every rotation."""
    if text is None:
        return None
    try:
        chosen = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--rotations takes comma-separated rotation numbers (0,2), got {text!r}") from None
    if not chosen:
        raise UsageError("--rotations names no rotation; give numbers such as 0,2")
    if len(set(chosen)) != len(chosen):
        raise UsageError(f"--rotations {text!r} names a rotation twice")
    return chosen


def _select(rotations: Sequence[Rotation], chosen: Sequence[int] | None, protocol: str) -> list[int]:
    if chosen is None:
        return [r.index for r in rotations]
    unknown = [r for r in chosen if not 0 <= r < len(rotations)]
    if unknown:
        raise UsageError(f"--rotations {','.join(map(str, unknown))} does not exist; protocol {protocol!r} has "
                         f"rotations 0..{len(rotations) - 1} here")
    return sorted(chosen)


# -- planning ---------------------------------------------------------------------------
def plan_cv(overrides: Mapping[str, Any], *, preset: str | None = None,
            rotations: Sequence[int] | None = None) -> CvPlan:
    """A new cross-validation: the configuration resolved as ``cdft run`` resolves it, the
    protocol's rotations over the folds present, checked before any directory is made."""
    from cdft_core.data.folds import fold_rotations
    from cdft_core.training.preflight import load_run_splits, preflight

    given = [flag(k) for k in ("val_fold", "test_fold") if k in overrides]
    if given:
        raise UsageError(f"cdft cv sets the validation and test fold of each rotation; drop {' and '.join(given)} "
                         f"(choose rotations with --rotations)")
    config = absolute_paths(resolve_config(overrides, preset=preset))
    check_output(config.output, config.runs_dir)
    preflight(config)
    protocol, default_folds = _protocol_of(config)
    folds = _present_folds(config, default_folds)
    declared = [Rotation(i, v, t) for i, (v, t) in enumerate(fold_rotations(protocol, folds))]
    plan = CvPlan(config, protocol.name, folds, declared, _select(declared, rotations, protocol.name))
    load_run_splits(rotation_config(plan, declared[plan.selected[0]]))  # a split error costs a second, not k runs
    return plan


def _protocol_of(config: RunConfig) -> tuple[FoldProtocol, int]:
    """The dataset's protocol for this run and its default number of folds."""
    from cdft_core.data.options import build_dataset, choose_protocol

    dataset, _ = build_dataset(config.dataset, config.dataset_options)
    return dataset.protocols[choose_protocol(dataset, config.protocol)], int(dataset.default_folds)


def _present_folds(config: RunConfig, default_folds: int) -> list[int]:
    """The fold numbers a run would see: the split file's, else ``folds`` (or the dataset's default) in memory."""
    if not config.split_file:
        return list(range(config.folds or default_folds))
    from cdft_core.data.tables import integer_column, read_split_file

    table = read_split_file(config.split_file)
    if "fold" not in table.columns:
        raise UsageError(f"split file {config.split_file!r} has no fold column; make one with `cdft prepare`")
    # the rule `cdft run` applies to the file: "0" and "0.0" (as pandas writes floats) are fold 0
    return sorted(set(integer_column(table, "fold", lambda row: f"split file {config.split_file!r} line {row + 2}")))


def reopen_cv(parent: str, overrides: Mapping[str, Any], *, preset: str | None = None,
              rotations: Sequence[int] | None = None) -> CvPlan:
    """The plan of an interrupted cross-validation, from its parent directory. Only the
    options a resumed run may change (:data:`~cdft_core.config.RESUME_OVERRIDES`) may be
    given; ``rotations`` may choose again among the declared ones."""
    changes = [k for k in overrides if k not in RESUME_OVERRIDES]
    if preset or changes:
        given = (["--config"] if preset else []) + [flag(k) for k in changes]
        raise UsageError(f"--resume continues a cross-validation with its saved configuration; drop {', '.join(given)} "
                         f"(only {', '.join(flag(k) for k in RESUME_OVERRIDES)} may change)")
    rundir = _local_absolute(RunDir(parent))
    if not rundir.exists(CV_PLAN) or not rundir.exists("config.yaml"):
        raise UsageError(f"{one_line(parent, 120)!r} is not a cdft cv directory (no {CV_PLAN} and config.yaml)")
    saved_config = rundir.join("config.yaml")
    config = merge(merge(RunConfig(), load_yaml(saved_config), source=saved_config), overrides, source="command line")
    validate(config)
    try:
        saved = json.loads(rundir.read_text(CV_PLAN))
        declared = [Rotation(int(r["rotation"]), int(r["val_fold"]), int(r["test_fold"])) for r in saved["rotations"]]
        protocol, folds, recorded = str(saved["protocol"]), [int(f) for f in saved["folds"]], saved["selected"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CdftError(f"{rundir.join(CV_PLAN)} is not a readable plan: {one_line(exc)}") from None
    selected = _select(declared, rotations, protocol) if rotations is not None else [int(r) for r in recorded]
    if rundir.exists(CV_SUMMARY) and selected == recorded:
        raise UsageError(f"cross-validation {parent!r} is complete (it has {CV_SUMMARY}); nothing to resume")
    return CvPlan(config, protocol, folds, declared, selected, parent=rundir.url, resume_overrides=dict(overrides))


def _local_absolute(rundir: RunDir) -> RunDir:
    return RunDir(os.path.abspath(rundir.url)) if rundir.is_local else rundir


def rotation_config(plan: CvPlan, rotation: Rotation) -> RunConfig:
    """The configuration of one rotation's run: the shared one with its folds and directory."""
    output = RunDir(plan.parent).join(rotation.name) if plan.parent else None
    return dataclasses.replace(plan.config, val_fold=rotation.val_fold, test_fold=rotation.test_fold, output=output)


def cv_name(config: RunConfig, when: float | None = None) -> str:
    """``<dataset>-<backbone>-<strategy>-cv-s<seed>-<YYYYmmdd-HHMMSS>``, filesystem-safe."""
    parts = [config.dataset, config.backbone, config.strategy, "cv", f"s{config.seed}"]
    return "-".join([*(safe_part(p) for p in parts), time_stamp(when)])


# -- running ----------------------------------------------------------------------------
def run_cv(plan: CvPlan, *, launch_options: LaunchOptions | None = None, argv: Sequence[str] | None = None,
           say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the chosen rotations one after the other (skipping complete ones, resuming a
    started one), then write ``cv_summary.json``; returns it."""
    say = say or _stderr
    rundir = _open_parent(plan)
    chosen = [plan.rotations[i] for i in plan.selected]
    for number, rotation in enumerate(chosen, 1):
        child = RunDir(rundir.join(rotation.name))
        where = f"rotation {rotation.index} ({number}/{len(chosen)}: val fold {rotation.val_fold}, test fold {rotation.test_fold})"
        if child.exists("summary.json"):
            say(f"cv: {where} is complete: skipped")
            continue
        resume = child.exists("config.yaml")
        say(f"cv: {where} {'resumes' if resume else 'starts'} in {child.url}")
        try:
            _run_rotation(plan, rotation, child.url if resume else None, launch_options, argv)
        except CdftError as exc:  # the same error and exit code, with the way to continue
            exc.args = (f"{where}: {exc}; continue the cross-validation with `cdft cv --resume {rundir.url}`",)
            raise
    summaries = [json.loads(RunDir(rundir.join(r.name)).read_text("summary.json")) for r in chosen]
    config = plan.config
    header = {"kind": "cv", "parent": rundir.url, "dataset": config.dataset, "protocol": plan.protocol,
              "backbone": config.backbone, "strategy": config.strategy, "seed": config.seed, "folds": plan.folds}
    summary = cv_summary(header, [r.to_json() for r in chosen], summaries)
    rundir.write_text(CV_SUMMARY, json.dumps(summary, indent=2))
    return summary


def _open_parent(plan: CvPlan) -> RunDir:
    """Create the parent of a new plan (config.yaml, cv.json), or record a resumed plan's choice of rotations."""
    if plan.parent is not None:
        rundir = RunDir(plan.parent)
        rundir.remove(CV_SUMMARY)  # written last: a summary of another choice of rotations no longer holds
        rundir.write_text(CV_PLAN, json.dumps(plan.to_json(), indent=2))
        return rundir
    rundir = _local_absolute(create_run_dir(plan.config.output, plan.config.runs_dir, cv_name(plan.config)))
    plan.parent = rundir.url
    plan.config = dataclasses.replace(plan.config, output=rundir.url)
    rundir.write_text(CV_PLAN, json.dumps(plan.to_json(), indent=2))  # first: it tells `cdft run` this is no run
    rundir.write_text("config.yaml", dump_yaml(plan.config))
    return rundir


def _run_rotation(plan: CvPlan, rotation: Rotation, resume: str | None, launch_options: LaunchOptions | None,
                  argv: Sequence[str] | None) -> None:
    """One rotation's run: here, or on torchrun's workers as a ``cdft run`` command line."""
    if launch_options is not None and launch_options.requested:
        from cdft_core.training.launch import WorkerCommand, launch

        if resume:
            args = ["run", "--resume", resume, *option_args(plan.resume_overrides)]
        else:
            args = ["run", *option_args(changed_values(rotation_config(plan, rotation)))]
        launch(launch_options, WorkerCommand("cdft_cli", tuple(args)))
        return
    from cdft_core.training import engine

    argv = list(argv if argv is not None else sys.argv)
    if resume:
        engine.main(resolve_config(plan.resume_overrides, resume=resume), resume=resume, argv=argv)
    else:
        engine.main(rotation_config(plan, rotation), argv=argv)


def _stderr(message: str) -> None:
    print(f"cdft: {message}", file=sys.stderr, flush=True)
