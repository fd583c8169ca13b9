"""``cdft eval``: re-evaluate a saved model on a split of its dataset.

The checkpoint carries everything needed: the model spec (the architecture is rebuilt
with ``model_from_spec``, nothing is downloaded), the run's configuration (dataset,
data root, split file, folds) and the class names. ``--data-root`` and ``--split-file``
point at moved data or another split.
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
@click.option("--num-workers", type=int, default=0, show_default=True, help="Data-loading worker processes.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def eval_command(target: str, split: str, split_file: str | None, data_root: str | None, batch_size: int | None,
                 num_workers: int, device: str, as_json: bool) -> None:
    """Evaluate the best checkpoint of RUN_DIR (or the CHECKPOINT file) and print its metrics.

    \b
    Examples:
      cdft eval runs/breakhis-test_vit-staged-v0t1-s1-20250101-120000
      cdft eval runs/x/stage1-frt/best.safetensors --split val --json
    """
    from cdft_cli.output import echo_json
    from cdft_core.config import RunConfig, merge, resolve_device, resolve_precision
    from cdft_core.errors import CdftError, UsageError

    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise UsageError(f"--num-workers must not be negative, got {num_workers}")
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {device!r} is not one of auto, cpu, cuda")
    checkpoint = find_checkpoint(target)

    import torch

    from cdft_core.data.datasets import load_splits
    from cdft_core.data.images import ImageDataset
    from cdft_core.data.transforms import eval_transform
    from cdft_core.models.model import model_from_spec
    from cdft_core.training.checkpoint import read_model
    from cdft_core.training.distributed import DistInfo
    from cdft_core.training.engine import evaluate

    tensors, meta = read_model(checkpoint)
    if "cdft_config" not in meta:
        raise UsageError(f"{checkpoint!r} has no run configuration in its metadata; it was not written by `cdft run`")
    config = merge(RunConfig(), meta["cdft_config"], source=checkpoint)
    root = data_root or config.data_root
    splits = load_splits(
        config.dataset, root, split_file=split_file or config.split_file, val_fold=config.val_fold,
        test_fold=config.test_fold, protocol=config.protocol, options=config.dataset_options, folds=config.folds,
        seed=config.seed,
    )
    classes = list(meta.get("cdft_classes") or splits.classes)
    if list(splits.classes) != classes:
        raise CdftError(f"the data has classes {splits.classes} but the checkpoint was trained on {classes}")
    table = getattr(splits, split)
    if len(table) == 0:
        raise UsageError(f"the {split} split is empty")

    torch_device = resolve_device(device)
    model = model_from_spec(meta["cdft_spec"])
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CdftError(f"{checkpoint!r} does not fit its own model spec ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected tensors)")
    model.to(torch_device)
    dist_info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device(torch_device))
    dataset = ImageDataset(splits.root, table, eval_transform(model.data_config))
    precision = resolve_precision(config.precision, torch_device)
    result = evaluate(model, dataset, classes, dist_info, batch_size or config.eval_batch_size or 2 * config.batch_size,
                      num_workers, precision)
    if as_json:
        echo_json({"checkpoint": checkpoint, "split": split, "stage": meta.get("cdft_stage"),
                   "epoch": meta.get("cdft_epoch"), "classes": classes, "metrics": result})
        return
    print_evaluation(checkpoint, split, meta, result, classes)


def find_checkpoint(target: str) -> str:
    """The model file to evaluate: TARGET itself, or the final best checkpoint of a run directory."""
    import json

    from cdft_core.errors import UsageError
    from cdft_core.training.rundir import RunDir

    rundir = RunDir(target)
    if not rundir.exists():
        raise UsageError(f"{target!r} does not exist; pass a run directory or a .safetensors checkpoint")
    if rundir.fs.isfile(rundir.path):
        return target
    if rundir.exists("summary.json"):
        return rundir.join(json.loads(rundir.read_text("summary.json"))["checkpoint"])
    stages = [name for name in rundir.listdir() if name.startswith("stage") and rundir.exists(f"{name}/best.safetensors")]
    if not stages:
        raise UsageError(f"{target!r} holds no checkpoint yet (no stage*/best.safetensors)")
    latest = max(stages, key=lambda name: int(name[len("stage"):].split("-", 1)[0]))
    return rundir.join(f"{latest}/best.safetensors")


def print_evaluation(checkpoint: str, split: str, meta: dict[str, Any], result: dict[str, Any], classes: list[str]) -> None:
    from cdft_core.training.metrics import format_confusion, format_table

    where = f" (stage {meta['cdft_stage']}, epoch {meta['cdft_epoch']})" if "cdft_stage" in meta else ""
    click.echo(f"checkpoint: {checkpoint}{where}")
    click.echo(format_table({split: result}, classes))
    click.echo(f"loss: {result['loss']:.4f}")
    click.echo(f"\nconfusion matrix ({split}):\n{format_confusion(result['confusion_matrix'], classes)}")
