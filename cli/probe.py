"""``cdft probe``: linear heads for a grid of learning rates and weight decays, trained at once
on the frozen backbone's cached pooled features; the best by validation accuracy is kept.

The work is :func:`cdft_core.training.probe.run_probe`; this command parses and prints.
The options it shares with ``cdft run`` are the same run-configuration fields, checked by
the same validation (the strategy is ``linear``, the adapter ``none``).
"""

from __future__ import annotations

from typing import Any

import click

from cdft_cli.run import config_options

#: the run-configuration fields a probe reads (the others fix what a probe is: linear, none, Adam)
PROBE_FIELDS = (
    "dataset", "data_root", "split_file", "val_fold", "test_fold", "folds", "protocol", "dataset_options",
    "backbone", "weights", "pretrained", "image_size", "batch_size", "eval_batch_size", "epochs", "warmup_epochs",
    "warmup_start_factor", "max_steps_per_epoch", "seed", "device", "precision", "num_workers", "cache", "cache_dir",
    "train_views", "augment", "output", "runs_dir",
)


@click.command("probe", context_settings={"max_content_width": 110})
@click.option("--config", "config_file", default=None, metavar="FILE.yaml",
              help="Read options from a YAML preset (as `cdft run`); command-line options override it.")
@click.option("--lrs", default="1e-4,3e-4,1e-3,3e-3", show_default=True, metavar="LR,LR,...",
              help="Learning rates of the heads (comma-separated).")
@click.option("--weight-decays", default="0,1e-3", show_default=True, metavar="WD,WD,...",
              help="Weight decays of the heads (comma-separated); one head per (lr, weight decay).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@config_options(PROBE_FIELDS)
def probe_command(config_file: str | None, lrs: str, weight_decays: str, as_json: bool, **params: Any) -> None:
    """Train one linear head per (learning rate, weight decay) at once on cached pooled
    features of a frozen BACKBONE, choose by validation accuracy, report every head's test metrics.

    Training images are seen as evaluation sees them (no augmentation), or with
    --train-views N as N stored augmented views (--augment chooses which). The run directory holds the chosen head
    as a whole-model checkpoint: `cdft eval RUN_DIR` reproduces its test metrics.

    \b
    Examples:
      cdft probe --dataset breakhis --data-root data/BreaKHis_v1 --split-file breakhis.csv \\
                 --backbone vit_base_patch16_clip_224.laion2b --lrs 1e-4,3e-4,1e-3,3e-3 --weight-decays 0,1e-4
    """
    from cdft_cli.cache_cmd import check_cache_dir
    from cdft_cli.output import echo_json
    from cdft_cli.run import config_overrides, print_results
    from cdft_core.config import resolve_config
    from cdft_core.training.probe import check_grid, run_probe
    from cdft_core.training.rundir import check_output

    grid = _numbers(lrs, "--lrs"), _numbers(weight_decays, "--weight-decays")
    check_grid(*grid)
    overrides = {**config_overrides(params), "strategy": "linear", "adapter": "none"}
    config = resolve_config(overrides, preset=config_file)
    check_cache_dir(config.cache_dir)
    check_output(config.output, config.runs_dir)
    summary = run_probe(config, *grid)
    if as_json:
        echo_json(summary)
        return
    click.echo(heads_table(summary))
    print_results(summary)


def _numbers(text: str, option: str) -> list[float]:
    from cdft_core.errors import UsageError

    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{option} takes comma-separated numbers, got {text!r}") from None


def heads_table(summary: dict[str, Any]) -> str:
    """Every head of the sweep: its rates, best epoch, validation and test figures; * marks the chosen one."""
    from cdft_cli.output import table

    probe = summary["probe"]
    rows = [("*" if i + 1 == probe["chosen"] else "", i + 1, f"{h['lr']:g}", f"{h['weight_decay']:g}", h["best_epoch"],
             f"{h['val']['accuracy']:.4f}", f"{h['test']['accuracy']:.4f}", f"{h['test']['f1_macro']:.4f}")
            for i, h in enumerate(probe["heads"])]
    headers = ("", "head", "lr", "weight decay", "best epoch", "val acc", "test acc", "test macro-F1")
    return "heads (chosen by validation accuracy: *)\n" + table(rows, headers, max_width=None)
