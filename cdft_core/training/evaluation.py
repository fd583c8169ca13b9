"""Evaluation: a model's metrics on a dataset, in a run (every rank) or of a saved checkpoint.

Each rank predicts its share (``DistributedSampler`` without shuffling, which pads the
last share by repeating images); the predictions are gathered, the repeats dropped and
the metrics computed once on exactly the evaluation set, so 1 and N processes give the
same numbers (docs/method.md#distributed-evaluation). :func:`predict` returns the
gathered predictions (a stage writes them per image), :func:`evaluate` their metrics.
``cdft eval`` uses the same function on a checkpoint (:func:`evaluate_checkpoint`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from cdft_core.errors import CdftError, UsageError
from cdft_core.training import metrics as metrics_lib
from cdft_core.training.distributed import DistInfo, gather_predictions
from cdft_core.training.loaders import WithIndex, make_loader
from cdft_core.training.log import progress_bar


def autocast(precision: str, device: torch.device) -> Any:
    """bf16/fp16 autocast on the device, or a no-op context for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


def eval_loader(dataset: torch.utils.data.Dataset, dist_info: DistInfo, batch_size: int, num_workers: int | str,
                persistent: bool = False) -> DataLoader:
    """This rank's share of ``dataset`` (no shuffling), as ``(image, label, index)`` batches."""
    sampler = DistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=False)
    return make_loader(WithIndex(dataset), list(sampler), batch_size, num_workers, 0, device=dist_info.device,
                       persistent=persistent)


def run_layout_loaders(dataset: torch.utils.data.Dataset, dist_info: DistInfo, batch_size: int,
                       num_workers: int | str, processes: int) -> list[DataLoader]:
    """In one process, the batches a run of ``processes`` processes evaluated, rank by rank.

    Why: a batch's images are computed together, and a convolution or matrix product may
    round differently for another batch make-up (a ResNet's loss moved in the 8th digit
    between 2 processes' 10 + 10 images and one process's 16 + 4). Evaluating each rank's
    share in its own batches gives ``cdft eval`` the run's logits bit for bit; the
    padding repeats are dropped by :func:`gather_predictions` as in the run (first copy,
    in rank order).
    """
    from dataclasses import replace

    return [eval_loader(dataset, replace(dist_info, rank=rank, world_size=processes), batch_size, num_workers)
            for rank in range(processes)]


@dataclass
class Predictions:
    """Every image's label and logits, once each, in dataset order (the rows of the split
    table): the same on every rank, whatever the number of processes. Kept apart from the
    metrics so a stage can also write them per image (``predictions.csv``)."""

    labels: torch.Tensor  # (n,) int64
    logits: torch.Tensor  # (n, classes) float32

    def probabilities(self) -> np.ndarray:
        """Softmax of the logits (float32, as the metrics see them: the file and the metrics agree)."""
        return torch.softmax(self.logits, 1).numpy()


def predict(model: torch.nn.Module, dataset: torch.utils.data.Dataset, classes: list[str], dist_info: DistInfo,
            batch_size: int, num_workers: int | str, precision: str, description: str = "evaluating",
            loader: DataLoader | None = None, layout: int = 1) -> Predictions:
    """The predictions of ``model`` on ``dataset``; every rank takes part and gets all of them.

    On a terminal, rank 0 shows a progress bar (``description``, batches); elsewhere nothing.
    ``loader``: an :func:`eval_loader` of ``dataset`` kept from an earlier call (a run's,
    whose workers persist), or stored features in its batches (a frozen stage's
    ``StoredEval``: its indices are rows of ``dataset`` too); by default a new one.
    ``layout``: in one process, the batches of a run of that many processes
    (:func:`run_layout_loaders`).
    """
    if loader is not None:
        loaders: list[Any] = [loader]
    elif layout > 1 and not dist_info.distributed:
        loaders = run_layout_loaders(dataset, dist_info, batch_size, num_workers, layout)
    else:
        loaders = [eval_loader(dataset, dist_info, batch_size, num_workers)]
    bar = progress_bar(dist_info.is_main, sum(len(part) for part in loaders), 0, description, unit="batch")
    was_training = model.training
    model.eval()
    indices, labels, logits = [], [], []
    try:
        with torch.no_grad():
            for images, target, index in itertools.chain.from_iterable(loaders):
                with autocast(precision, dist_info.device):
                    out = model(images.to(dist_info.device, non_blocking=True))
                logits.append(out.float().cpu())
                labels.append(target)
                indices.append(index)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    model.train(was_training)
    k = len(classes)
    local = (torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long),
             torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
             torch.cat(logits) if logits else torch.zeros(0, k))
    _, all_labels, all_logits = gather_predictions(*local, dist_info, len(dataset))
    return Predictions(all_labels, all_logits)


def metrics_of(predictions: Predictions, classes: list[str], groups: Sequence[str] | None = None) -> dict[str, Any]:
    """The metrics of ``predictions`` (:func:`~cdft_core.training.metrics.compute_metrics`,
    patient-level ones when ``groups`` are given) and the cross-entropy loss."""
    labels, logits = predictions.labels, predictions.logits
    result = metrics_lib.compute_metrics(labels.numpy(), predictions.probabilities(), classes, groups)
    result["loss"] = float(F.cross_entropy(logits, labels)) if len(labels) else 0.0
    return result


def evaluate(model: torch.nn.Module, dataset: torch.utils.data.Dataset, classes: list[str], dist_info: DistInfo,
             batch_size: int, num_workers: int | str, precision: str, description: str = "evaluating",
             loader: DataLoader | None = None, groups: Sequence[str] | None = None) -> dict[str, Any]:
    """Metrics of ``model`` on ``dataset`` (:func:`predict`, then :func:`metrics_of`); every
    rank gets the same numbers. ``groups``: each row's patient (``Splits.groups``), or None."""
    return metrics_of(predict(model, dataset, classes, dist_info, batch_size, num_workers, precision, description,
                              loader), classes, groups)


# -- a saved checkpoint (cdft eval) ------------------------------------------------------
@dataclass
class CheckpointEvaluation:
    """What ``cdft eval`` prints: the checkpoint, its metadata and the metrics."""

    checkpoint: str
    split: str
    metadata: dict[str, Any]
    classes: list[str]
    metrics: dict[str, Any]
    image_cache: str | None = None  # the run's image cache it read (its folder), None: images decoded
    predictions: Predictions | None = None  # per image, in the split table's order


def find_checkpoint(target: str) -> str:
    """The model file to evaluate: TARGET itself, or the final best checkpoint of a run directory."""
    from cdft_core.training.rundir import CV_PLAN, RunDir

    rundir = RunDir(target)
    if not rundir.exists():
        raise UsageError(f"{target!r} does not exist; pass a run directory or a .safetensors checkpoint")
    if not rundir.fs.isdir(rundir.path):
        return target  # a file (or a device, a pipe: read_model refuses those)
    if rundir.exists("summary.json"):
        return rundir.join(_summary_checkpoint(rundir, target))
    if rundir.exists(CV_PLAN):
        rotations = sorted(name for name in rundir.listdir() if name.startswith("rotation-"))
        example = f" (e.g. {rundir.join(rotations[0])})" if rotations else ""
        raise UsageError(f"{target!r} is a cross-validation directory, not one run; name one of its rotation-N runs"
                         f"{example}, or summarise them with `cdft report {target}`")
    if not rundir.exists("config.yaml"):
        runs = [name for name in rundir.listdir() if rundir.exists(f"{name}/config.yaml") or rundir.exists(f"{name}/{CV_PLAN}")]
        if runs:
            raise UsageError(f"{target!r} holds {len(runs)} runs, not one (a grid's or a runs folder); name one of them "
                             f"(e.g. {rundir.join(runs[0])}), or compare them with `cdft report {target}`")
    latest = _latest_stage_checkpoint(rundir)
    if latest is None:
        raise UsageError(f"{target!r} holds no checkpoint yet (no stage*/best.safetensors)")
    return rundir.join(latest)


def _latest_stage_checkpoint(rundir: Any) -> str | None:
    """``stageN-.../best.safetensors`` of the highest-numbered stage that has one, or None."""
    numbered = [(_stage_number(name), name) for name in rundir.listdir()]
    stages = [(n, name) for n, name in numbered if n is not None and rundir.exists(f"{name}/best.safetensors")]
    return f"{max(stages)[1]}/best.safetensors" if stages else None


def _summary_checkpoint(rundir: Any, target: str) -> str:
    """The checkpoint ``summary.json`` names, relative to the run directory.

    The summary is read back from disk, so it is checked like any input: a damaged one is
    one error line (not a ``JSONDecodeError``), and a ``checkpoint`` outside the run (an
    absolute path, ``..``) is refused: it would make cdft open any file on the machine.
    """
    from cdft_core.training.checkpoint import MAX_RECORD_BYTES, inside_run, read_bounded

    name = rundir.join("summary.json")
    try:
        summary = json.loads(read_bounded(rundir.fs, f"{rundir.path}/summary.json", name, most=MAX_RECORD_BYTES))
    except (CdftError, OSError, ValueError, RecursionError):
        summary = None
    checkpoint = summary.get("checkpoint") if isinstance(summary, dict) else None
    if inside_run(checkpoint):
        return checkpoint
    latest = _latest_stage_checkpoint(rundir)
    example = rundir.join(latest) if latest else rundir.join("stage1-.../best.safetensors")
    raise UsageError(f"{name!r} is damaged (it does not name a checkpoint inside {target!r}); "
                     f"pass the checkpoint file itself (e.g. {example})")


def _stage_number(name: str) -> int | None:
    """N of a stage folder ``stageN`` or ``stageN-...``; ``None`` for any other name (``stage_x``...)."""
    import re

    match = re.fullmatch(r"stage(\d+)(?:-.*)?", name.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def evaluate_checkpoint(target: str, *, split: str = "test", split_file: str | None = None,
                        data_root: str | None = None, batch_size: int | None = None, num_workers: int | str = 0,
                        device: str = "auto") -> CheckpointEvaluation:
    """Re-evaluate a saved model on a split of its run's data (or ``split_file``/``data_root``).

    The checkpoint carries the model spec (rebuilt without downloading anything), the
    run's configuration and the class names. A checkpoint of a run directory is evaluated
    on the run's own ``split.csv`` (the rows it trained on) when the run has one, so an
    edited split file cannot change what its summary reports; one warning line says so
    when the configured file now gives other rows. Older runs read the configured file.
    """
    from cdft_core.config import RunConfig, merge, resolve_device
    from cdft_core.data.image_cache import cache_for_tables
    from cdft_core.data.images import ImageDataset
    from cdft_core.data.splits import load_splits
    from cdft_core.data.tables import DECODE_CHECK
    from cdft_core.data.transforms import eval_transform
    from cdft_core.inference.model_loading import inference_precision, model_from_tensors, recorded_plugins
    from cdft_core.training.checkpoint import read_model
    from cdft_core.training.rundir import run_split_of

    checkpoint = find_checkpoint(target)
    tensors, meta = read_model(checkpoint)
    if "cdft_config" not in meta:
        raise UsageError(f"{checkpoint!r} has no run configuration in its metadata; it was not written by `cdft run`")
    config = merge(RunConfig(), meta["cdft_config"], source=checkpoint)

    def load(path: str | None, decode_check: int | None = DECODE_CHECK) -> Any:
        with recorded_plugins(meta):
            return load_splits(
                config.dataset, data_root or config.data_root, split_file=path,
                val_fold=config.val_fold, test_fold=config.test_fold, protocol=config.protocol,
                options=config.dataset_options, folds=config.folds, seed=config.seed, decode_check=decode_check,
            )

    own = None if split_file else run_split_of(checkpoint)
    splits = load(split_file or own or config.split_file)
    if own and config.split_file and _split_changed(config.split_file, splits, load):
        import click

        click.echo(f"warning: split file {config.split_file!r} changed since the run; evaluating the run's own copy "
                   f"{own!r} (pass --split-file to evaluate another split)", err=True)
    classes = list(meta.get("cdft_classes") or splits.classes)
    if list(splits.classes) != classes:
        raise CdftError(f"the data has classes {splits.classes} but the checkpoint was trained on {classes}")
    table = getattr(splits, split)
    if len(table) == 0:
        raise UsageError(f"the {split} split is empty")

    torch_device = resolve_device(device)
    model = model_from_tensors(tensors, meta, checkpoint, torch_device)
    dist_info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device(torch_device))
    # the run's image cache when it is still there (one pass gains nothing from building one)
    cache = cache_for_tables(splits.root, [splits.train, splits.val, splits.test], model.data_config,
                             cache_dir=config.cache_dir, build=False) if config.cache else None
    dataset = ImageDataset(splits.root, table, eval_transform(model.data_config), cache)
    # without --batch-size: the run's batches, as its processes made them (its logits bit for bit)
    layout = 1 if batch_size else _recorded_processes(meta)
    outputs = predict(model, dataset, classes, dist_info, batch_size or eval_batch_size(config), num_workers,
                      inference_precision(config.precision, torch_device), description=f"evaluating {split}",
                      layout=layout)
    result = metrics_of(outputs, classes, splits.groups(split))
    return CheckpointEvaluation(checkpoint, split, meta, classes, result, cache.directory if cache else None, outputs)


def _recorded_processes(meta: dict[str, Any]) -> int:
    """The processes of the run that wrote a checkpoint (1 for older files and probes)."""
    value = meta.get("cdft_world_size", 1)
    return value if isinstance(value, int) and 1 <= value <= 4096 else 1


def _split_changed(configured: str, own: Any, load: Any) -> bool:
    """Whether the split file a run was configured with, where it still exists, now gives other
    rows, folds, labels or groups than ``own`` (the splits of the run's copy); a file that no
    longer loads counts as changed, one that is gone does not (nothing to confuse it with)."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(str(configured))
        if not fs.exists(path):
            return False
        current = load(configured, 0)
    except (CdftError, UsageError, OSError, ValueError, ImportError):
        return True
    if list(current.classes) != list(own.classes):
        return True
    for name in ("train", "val", "test"):
        ours, theirs = getattr(own, name), getattr(current, name)
        if any(ours[c].tolist() != theirs[c].tolist() for c in ("image_path", "label", "fold")):
            return True
        if own.groups(name) != current.groups(name):
            return True
    return False


def eval_batch_size(config: Any) -> int:
    """The evaluation batch: ``eval_batch_size``, else twice the training batch (no gradients to keep)."""
    return config.eval_batch_size or 2 * config.batch_size
