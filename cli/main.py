"""The ``cdft`` click application: a lazy command group and the one place errors become exit codes.

Command modules are imported only when their command runs (or its own ``--help`` is
asked for), and plugins load inside commands, so ``cdft --help`` stays fast and a broken
plugin cannot break it.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from typing import Any

import click

from cdft_core import __version__
from cdft_core.errors import CdftError

#: name -> (module, attribute, one-line help shown by ``cdft --help``)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "list": ("cdft_cli.list_cmd", "list_command", "List datasets, backbones, adapters and strategies."),
    "show": ("cdft_cli.show_cmd", "show_command", "Describe one component (resolves names like `cdft run`)."),
    "plugins": ("cdft_cli.plugins_cmd", "plugins_command", "Show installed plugins, their hooks and load errors."),
    "prepare": ("cdft_cli.prepare", "prepare_command", "Scan a dataset and write a leakage-free split CSV."),
    "make-synthetic": ("cdft_cli.synthetic", "make_synthetic_command", "Write a small synthetic dataset (BreakHis layout)."),
    "run": ("cdft_cli.run", "run_command", "Fine-tune a backbone (single process or torchrun-launched)."),
    "cv": ("cdft_cli.cv_cmd", "cv_command", "Cross-validate: every rotation of the fold protocol, with mean, std and 95% CI."),
    "grid": ("cdft_cli.grid_cmd", "grid_command", "Run, list or print the cells of a grid of cross-validations (GRID.yaml)."),
    "report": ("cdft_cli.report_cmd", "report_command", "Tables, plots, paired tests and one HTML page from runs, cv and grid dirs."),
    "eval": ("cdft_cli.eval", "eval_command", "Re-evaluate a saved run or checkpoint."),
    "probe": ("cdft_cli.probe", "probe_command", "Linear heads for a grid of lrs and weight decays at once, on cached features."),
    "demo": ("cdft_cli.demo", "demo_command", "Synthetic data + staged fine-tune of a tiny model, end to end on CPU."),
    "cache": ("cdft_cli.cache_cmd", "cache_command", "Show or free the image and feature caches (`cdft cache list`, `clear`)."),
    "predict": ("cdft_cli.predict_cmd", "predict_command", "Class probabilities of a trained run for images, folders, globs or a CSV."),
    "embed": ("cdft_cli.embed_cmd", "embed_command", "Per-image features of a trained run or a backbone, to safetensors."),
    "export": ("cdft_cli.export_cmd", "export_command", "Export a run's model to ONNX or .pt2 (dynamic batch, checked against PyTorch)."),
    "explain": ("cdft_cli.explain_cmd", "explain_command", "Grad-CAM heatmaps over images for the predicted (or a chosen) class."),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[cmd_name]
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context) -> Any:
        """The subcommand (its parsing and ``--help`` too); a closed stdout leaves as :class:`_ReaderGone`,
        because click itself turns EPIPE into exit code 1 without a word."""
        try:
            return super().invoke(ctx)
        except BrokenPipeError as exc:
            raise _ReaderGone() from exc

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_text) for name, (_, _, help_text) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


class _ReaderGone(Exception):
    """The reader of our output stopped reading (``cdft list ... | head -1``): not a failure."""


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so the flush at interpreter exit does not print
    "Exception ignored ... BrokenPipeError" for what is left in its buffer."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real stdout (a test's captured one): nothing to quiet
        pass
    finally:
        os.close(devnull)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="cdft")
@click.option("--debug", is_flag=True, help="Show tracebacks (also CDFT_DEBUG=1).")
def cli(debug: bool) -> None:
    """cdft: cross-domain fine-tuning of natural-image backbones on medical images."""
    if debug:
        os.environ["CDFT_DEBUG"] = "1"


def debugging() -> bool:
    from cdft_core.errors import UsageError
    from cdft_core.text import env_flag

    try:
        return env_flag("CDFT_DEBUG") or "--debug" in sys.argv[1:2]
    except UsageError:  # an unreadable value asks for more detail, not less
        return True


#: the launcher of ``cdft run --nproc-per-node N`` sets it for its workers (cdft_core.training.launch)
LAUNCHED_ENV = "CDFT_LAUNCHED_RUN_DIR_FILE"


def launched_worker() -> bool:
    """Whether this process is a worker of cdft's own launcher: its errors go to torchrun's
    error file, and the launcher prints one line for the whole job (not one per rank)."""
    return bool(os.environ.get(LAUNCHED_ENV))


def error(message: str) -> None:
    """Print one error line on stderr (a launched worker leaves it to its launcher, unless debugging)."""
    if launched_worker() and not debugging():
        return
    click.echo(f"cdft: error: {message}", err=True)


def main(args: list[str] | None = None, prog_name: str = "cdft") -> Any:
    """Run the CLI and turn every failure into one line and an exit code (0, 1 or 2)."""
    run = cli.main
    if launched_worker():  # any error, not only the engine's, reaches the launcher's one line
        from torch.distributed.elastic.multiprocessing.errors import record

        run = record(cli.main)
    try:
        code = run(args=args, prog_name=prog_name, standalone_mode=False)
        sys.stdout.flush()  # what is still buffered meets a closed pipe here, not at exit
    except (_ReaderGone, BrokenPipeError):
        _quiet_stdout()
        code = 0
    except click.exceptions.Abort:
        error("aborted")
        code = 130
    except KeyboardInterrupt:
        error("interrupted")
        code = 130
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        code = 2
    except click.UsageError as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        if debugging():
            traceback.print_exc()
        error(f"{exc.format_message()}{hint}")
        code = 2
    except click.ClickException as exc:
        error(exc.format_message())
        code = exc.exit_code
    except CdftError as exc:
        if debugging():
            traceback.print_exc()
        error(str(exc))
        code = exc.exit_code
    except Exception as exc:  # anything else is a bug or an environment failure
        debug = debugging()
        if debug:
            traceback.print_exc()
        error(f"{type(exc).__name__}: {exc}" + ("" if debug else " (rerun with --debug for the traceback)"))
        code = 1
    if isinstance(code, int):
        sys.exit(code)
    sys.exit(0)
