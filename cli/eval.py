"""``cdft eval``: re-evaluate a saved model on a split of its dataset.

The work is :func:`cdft_core.training.evaluation.evaluate_checkpoint`; this command parses
and prints. ``--data-root`` and ``--split-file`` point at moved data or another split.
"""

from __future__ import annotations

from typing import Any

import click


@click.command("eval")
@click.argument("target", metavar="RUN_DIR|CHECKPOINT")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True,
              help="Which split of the run's dataset to evaluate.")
@click.option("--split-file", default=None, help="Evaluate the folds of this split CSV instead of the run's.")
@click.option("--data-root", default=None, help="The images are here now (default: the run's data root).")
@click.option("--batch-size", type=int, default=None, help="Evaluation batch size (default: the run's).")
@click.option("--num-workers", default="auto", show_default=True,
              help="Data-loading worker processes: a number, or auto (this process's CPUs, at most 8).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def eval_command(target: str, split: str, split_file: str | None, data_root: str | None, batch_size: int | None,
                 num_workers: str, device: str, as_json: bool) -> None:
    """Evaluate the best checkpoint of RUN_DIR (or the CHECKPOINT file) and print its metrics.

    \b
    Examples:
      cdft eval runs/breakhis-test_vit-staged-v0t1-s1-20250101-120000
      cdft eval runs/x/stage1-frt/best.safetensors --split val --json
    """
    from cdft_cli.output import echo_json
    from cdft_core.config import check_num_workers, resolve_device
    from cdft_core.errors import UsageError
    from cdft_core.inference.model_loading import model_file
    from cdft_core.training.evaluation import evaluate_checkpoint

    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    workers = check_num_workers(num_workers)
    resolve_device(device)  # a device this machine lacks: one usage line before any work
    # the run's checkpoint, found once; a split CSV or other non-checkpoint: a usage error, not a safetensors failure
    result = evaluate_checkpoint(model_file(target), split=split, split_file=split_file, data_root=data_root,
                                 batch_size=batch_size, num_workers=workers, device=device)
    meta = result.metadata
    if as_json:
        echo_json({"checkpoint": result.checkpoint, "split": split, "stage": meta.get("cdft_stage"),
                   "epoch": meta.get("cdft_epoch"), "classes": result.classes, "metrics": result.metrics})
        return
    print_evaluation(result.checkpoint, split, meta, result.metrics, result.classes)


def print_evaluation(checkpoint: str, split: str, meta: dict[str, Any], result: dict[str, Any], classes: list[str]) -> None:
    from cdft_core.training.metrics import format_confusion, format_table

    where = f" (stage {meta['cdft_stage']}, epoch {meta['cdft_epoch']})" if "cdft_stage" in meta else ""
    click.echo(f"checkpoint: {checkpoint}{where}")
    click.echo(format_table({split: result}, classes))
    click.echo(f"loss: {result['loss']:.4f}")
    click.echo(f"\nconfusion matrix ({split}):\n{format_confusion(result['confusion_matrix'], classes)}")
