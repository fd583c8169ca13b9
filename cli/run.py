"""``cdft run``: fine-tune a backbone, in this process or on several through torchrun.

Every field of :class:`cdft_core.config.RunConfig` is an option here (``val_fold`` <->
``--val-fold``), so the command line, ``--config FILE.yaml`` presets and the
``config.yaml`` a run saves use the same names. Launcher options (``--nproc-per-node``,
``--nnodes``...) hand the job to torchrun's launcher (:mod:`cdft_core.training.launch`); its
workers run this same command and train in-process as ranks.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any

import click

from cdft_core.config import FIELD_NAMES, RunConfig

if TYPE_CHECKING:
    from cdft_core.training.launch import WorkerCommand

#: config fields given as repeatable ``--<name>-option KEY=VALUE`` options
_DICT_OPTIONS = {"dataset_options": "--dataset-option", "adapter_options": "--adapter-option",
                 "strategy_options": "--strategy-option"}
#: what a value looks like, where TEXT would say too little
_METAVARS = {"data_root": "DIR|URL", "split_file": "CSV", "weights": "FILE", "output": "DIR|URL", "runs_dir": "DIR",
             "dataset": "NAME", "backbone": "NAME", "adapter": "NAME", "strategy": "NAME", "protocol": "NAME",
             "optimizer": "NAME", "device": "NAME", "precision": "NAME", "num_workers": "N|auto", "cache_dir": "DIR",
             "augment": "paper|paper+hed|none", "class_weights": "none|balanced", "sampler": "random|balanced",
             "accumulate": "N", "patience": "N", "ema": "DECAY"}
#: short forms, as the other commands spell them (``cdft prepare -o``)
_SHORT = {"output": ("-o",)}
#: the launcher options (handed to torchrun, not to the workers)
LAUNCH_PARAMS = ("nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint", "rdzv_id", "rdzv_backend")


#: ``--help`` sections: (title, the first parameter of the section), in option order
_HELP_SECTIONS = (("Run", "config_file"), ("Data", "dataset"), ("Model", "backbone"), ("Strategy", "strategy"),
                  ("Optimisation (defaults: the paper's recipe)", "optimizer"), ("Hardware", "device"),
                  ("Output", "output"), ("Distributed launch (torchrun)", "nproc_per_node"))


class _SectionedCommand(click.Command):
    """``cdft run --help`` with its fifty options grouped under headings."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        starts = {first: title for title, first in _HELP_SECTIONS}
        help_option = self.get_help_option(ctx)
        if help_option is not None:
            starts[str(help_option.name)] = "Other"
        sections: list[tuple[str, list[tuple[str, str]]]] = []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.name in starts or not sections:
                sections.append((starts.get(str(param.name), "Options"), []))
            sections[-1][1].append(record)
        for title, records in sections:
            with formatter.section(title):
                formatter.write_dl(records)


def config_options(names: Collection[str] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator adding one click option per config field (``names`` only, when given),
    each defaulting to None so given options are known (``cdft run``, ``cdft probe``)."""
    return functools.partial(_config_options, names=names)


def _config_options(func: Callable[..., Any], names: Collection[str] | None = None) -> Callable[..., Any]:
    """One click option per config field, defaulting to None so given options are known."""
    defaults = RunConfig()
    for f in reversed(dataclasses.fields(RunConfig)):
        if names is not None and f.name not in names:
            continue
        help_text = f.metadata.get("help", "")
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if f.name in _DICT_OPTIONS:
            func = click.option(_DICT_OPTIONS[f.name], f.name, multiple=True, metavar="KEY=VALUE",
                                help=f"{help_text} (repeatable)")(func)
            continue
        if default is not None:
            help_text += f"  [default: {default}]"
        kind = str(f.type)
        if kind.startswith("bool"):
            func = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=help_text)(func)
        else:
            # ``int | str`` (num_workers: a count or auto) is checked by the config, as a string here
            click_type = str if "str" in kind else int if kind.startswith("int") else float if kind.startswith("float") else str
            decls = (flag, *_SHORT.get(f.name, ()))
            func = click.option(*decls, f.name, type=click_type, default=None, metavar=_METAVARS.get(f.name),
                                help=help_text)(func)
    return func


def _launch_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--nproc-per-node", "nproc_per_node", default=None,
                     help="Launch N processes on this node through torchrun (a number, or auto, cpu, gpu)."),
        click.option("--nnodes", default=None, help="Number of nodes (N or MIN:MAX); >1 needs --rdzv-endpoint."),
        click.option("--node-rank", "node_rank", type=int, default=None,
                     help="This node's rank (used by --rdzv-backend static; c10d assigns ranks itself)."),
        click.option("--rdzv-endpoint", "rdzv_endpoint", default=None,
                     help="HOST:PORT of the rendezvous shared by all nodes (default: a free local port)."),
        click.option("--rdzv-id", "rdzv_id", default=None, help="Job id shared by all nodes of one run (default: cdft)."),
        click.option("--rdzv-backend", "rdzv_backend", default=None, help="c10d (default) or static."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.command("run", cls=_SectionedCommand, context_settings={"max_content_width": 110})
@click.option("--config", "config_file", default=None, metavar="FILE.yaml",
              help="Read options from a YAML preset (see configs/); command-line options override it.")
@click.option("--resume", default=None, metavar="RUN_DIR",
              help="Continue an interrupted run from its last saved state, with its saved configuration.")
@_config_options
@_launch_options
@click.pass_context
def run_command(ctx: click.Context, config_file: str | None, resume: str | None, **params: Any) -> None:
    """Fine-tune BACKBONE on DATASET with a fine-tuning STRATEGY (defaults: the paper's recipe).

    \b
    Examples:
      cdft run --dataset breakhis --data-root data/BreaKHis_v1 --split-file breakhis.csv \\
               --backbone vit_base_patch16_clip_224.laion2b --strategy staged
      cdft run --config configs/hcrf-vit-staged.yaml --data-root data/HCRF --nproc-per-node 2
      cdft run --resume runs/breakhis-vit_base_patch16_clip_224.laion2b-staged-v0t1-s1-20250101-120000
    """
    from cdft_cli.cache_cmd import check_cache_dir
    from cdft_core.config import resolve_config
    from cdft_core.errors import UsageError
    from cdft_core.training.distributed import launched_by_torchrun
    from cdft_core.training.launch import LaunchOptions
    from cdft_core.training.preflight import preflight
    from cdft_core.training.rundir import check_output

    launch_options = LaunchOptions(**{name: params.pop(name) for name in LAUNCH_PARAMS})
    config = resolve_config(config_overrides(params), preset=config_file, resume=resume)
    check_cache_dir(config.cache_dir)
    if not resume and not launched_by_torchrun():
        check_output(config.output, config.runs_dir)
    preflight(config)
    if launch_options.requested:
        if launched_by_torchrun():
            raise UsageError("this process was already started by torchrun; drop the launcher options (--nproc-per-node ...)")
        from cdft_core.training.launch import launch
        from cdft_core.training.preflight import load_run_splits

        load_run_splits(config)  # a fold or split-file error costs a second here, not N failing workers
        launch(launch_options, worker_command(ctx))
        return
    summary = _train(config, resume)
    if summary is not None:
        print_results(summary, tensorboard=config.tensorboard)


def config_overrides(params: Mapping[str, Any]) -> dict[str, Any]:
    """The config keys given on the command line (None and empty repeats mean "not given")."""
    from cdft_core.config import check_num_workers, parse_key_values

    out: dict[str, Any] = {}
    for name, value in params.items():
        if name not in FIELD_NAMES or value is None or value == ():
            continue
        if name in _DICT_OPTIONS:
            value = parse_key_values(value, option=_DICT_OPTIONS[name], typed=name != "dataset_options")
        elif name == "num_workers":  # checked here so its error names the option, not "command line: num_workers"
            value = check_num_workers(value)
        out[name] = value
    return out


def worker_command(ctx: click.Context) -> WorkerCommand:
    """What each torchrun worker runs: ``python -m cdft_cli`` with this command line minus
    the launcher options, rebuilt from the parsed parameters (the one place it is built)."""
    from click.core import ParameterSource

    from cdft_core.training.launch import WorkerCommand

    args = ["run"]
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name in LAUNCH_PARAMS:
            continue
        if ctx.get_parameter_source(param.name) not in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            continue
        value = ctx.params.get(param.name)
        if value is None:
            continue
        if param.is_flag and param.secondary_opts:
            args.append(param.opts[0] if value else param.secondary_opts[0])
        elif param.multiple:
            for item in value:
                args += [param.opts[0], str(item)]
        else:
            args += [param.opts[0], str(value)]
    return WorkerCommand("cdft_cli", tuple(args))


def _train(config: RunConfig, resume: str | None) -> dict[str, Any] | None:
    """Run the engine here; under torchrun, record errors where the launcher reports them."""
    from cdft_core.training import engine
    from cdft_core.training.distributed import launched_by_torchrun

    if launched_by_torchrun():
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(engine.main)(config, resume=resume, argv=sys.argv)
    return engine.main(config, resume=resume, argv=sys.argv)


def print_results(summary: Mapping[str, Any], *, tensorboard: bool = True) -> None:
    """The result table (validation and test at the best epoch of each stage) and where to look
    next (the TensorBoard command only where event files were written)."""
    from cdft_core.training.metrics import format_confusion, format_table

    columns: dict[str, dict[str, Any]] = {}
    stages = summary.get("stages", [])
    for stage in stages:
        prefix = f"{stage['name']} " if len(stages) > 1 else ""
        columns[f"{prefix}val"] = stage["val"]
        columns[f"{prefix}test"] = stage["test"]
    click.echo(f"\nresult: test metrics at the best validation epoch ({summary['best_stage']} stage, "
               f"epoch {summary['best_epoch']})")
    click.echo(format_table(columns, summary.get("classes")))
    click.echo(f"\ntest confusion matrix:\n{format_confusion(summary['test']['confusion_matrix'], summary['classes'])}")
    run_dir = summary["run_dir"]
    click.echo(f"\nrun directory: {run_dir}")
    if summary.get("kind") != "probe" and tensorboard:  # a probe, or --no-tensorboard, writes no event files
        click.echo(f"tensorboard --logdir {run_dir.rstrip('/')}/tensorboard")
