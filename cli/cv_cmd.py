"""``cdft cv``: one run per rotation of the dataset's fold protocol, then every metric's mean,
standard deviation and 95 % confidence interval over the rotations.

It takes every ``cdft run`` option — the very parameters of ``cdft run``, copied from it,
so the two can never drift apart — with ``--resume PARENT`` continuing a cross-validation
and ``--rotations`` choosing some rotations. The work is :mod:`cdft_core.experiments.cv`.
"""

from __future__ import annotations

import copy
import inspect
import sys
from typing import Any

import click

from cdft_cli.run import LAUNCH_PARAMS, run_command

_RESUME = click.Option(["--resume"], default=None, metavar="PARENT",
                       help="Continue an interrupted cross-validation: complete rotations are skipped, a started one "
                            "resumes (only the options `cdft run --resume` allows may change).")
_ROTATIONS = click.Option(["--rotations"], default=None, metavar="R,R,...",
                          help="Run only these rotations (default: every rotation the protocol declares).")


def _cv(config_file: str | None, resume: str | None, rotations: str | None, **params: Any) -> None:
    """Cross-validate BACKBONE on DATASET with STRATEGY: one child run per rotation of the
    dataset's fold protocol (standard, k folds: rotation r tests on fold r and validates on
    fold (r+1) mod k; HCRF's low-data protocol states its own), all in one parent directory
    with cv_summary.json: every metric per rotation, its mean, standard deviation and 95 % CI.

    \b
    Examples:
      cdft cv --config configs/breakhis-vit-staged.yaml --data-root data/BreaKHis_v1 --split-file breakhis-splits.csv
      cdft cv --config configs/hcrf-vit-frt.yaml --data-root data/HCRF --rotations 0,2 --nproc-per-node 2
      cdft cv --resume runs/breakhis-vit_base_patch16_clip_224.laion2b-staged-cv-s1-20250101-120000
    """
    from cdft_cli.cache_cmd import check_cache_dir
    from cdft_cli.run import config_overrides
    from cdft_core.errors import UsageError
    from cdft_core.experiments.cv import parse_rotations, plan_cv, reopen_cv, run_cv
    from cdft_core.experiments.cv_summary import cv_table
    from cdft_core.training.distributed import launched_by_torchrun
    from cdft_core.training.launch import LaunchOptions

    if launched_by_torchrun():
        raise UsageError("run `cdft cv` itself, not under torchrun; it launches each rotation (--nproc-per-node ...)")
    launch_options = LaunchOptions(**{name: params.pop(name) for name in LAUNCH_PARAMS})
    overrides = config_overrides(params)
    chosen = parse_rotations(rotations)
    if resume:
        plan = reopen_cv(resume, overrides, preset=config_file, rotations=chosen)
    else:
        plan = plan_cv(overrides, preset=config_file, rotations=chosen)
    check_cache_dir(plan.config.cache_dir)
    summary = run_cv(plan, launch_options=launch_options, argv=sys.argv)
    click.echo(f"\ncross-validation: {len(summary['rotations'])} rotations of protocol {summary['protocol']!r} "
               f"(test and validation metrics at each run's best validation epoch)")
    click.echo(cv_table(summary))
    click.echo(f"\ncv directory: {summary['parent']}  (cv_summary.json; one run per rotation-N folder)")


#: ``cdft run`` options each rotation chooses: hidden from ``cdft cv --help`` (still parsed, so
#: passing one gets the refusal that says why, not "no such option")
_ROTATION_CHOSEN = ("val_fold", "test_fold")


def _params() -> list[click.Parameter]:
    """``cdft run``'s parameters, with its ``--resume`` replaced by ours and ``--rotations`` after it."""
    params: list[click.Parameter] = []
    for param in run_command.params:
        if param.name in _ROTATION_CHOSEN:
            param = copy.copy(param)  # a copy: `cdft run --help` still lists them
            param.hidden = True
        params += [_RESUME, _ROTATIONS] if param.name == "resume" else [param]
    return params


cv_command = type(run_command)(
    "cv", callback=_cv, params=_params(), help=inspect.getdoc(_cv), context_settings={"max_content_width": 110},
    short_help="Cross-validate: every rotation of the dataset's fold protocol, with mean, std and 95% CI.",
)
