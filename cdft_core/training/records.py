"""What a run leaves behind: metric lines, TensorBoard scalars, best checkpoints, resume
states, logs and the summary. Files are written by rank 0 only (see
:mod:`cdft_core.training.rundir` for the layout)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import torch

from cdft_core.training import metrics as metrics_lib
from cdft_core.training.checkpoint import RESUME_DIR, capture_rng, read_model, resume_tag, save_model, save_resume
from cdft_core.training.distributed import all_gather_objects, barrier, broadcast_object
from cdft_core.training.loaders import train_order
from cdft_core.training.rundir import run_plugins
from cdft_core.training.state import Run
from cdft_core.training.tensorboard_log import grid_per_class, pick_grid


def stage_dir(run: Run, index: int) -> str:
    """``stage1-frt``: the stage's sub-directory (checkpoints, confusion matrix)."""
    return f"stage{index + 1}-{run.strategy.stages[index].name}"


def record(run: Run, index: int, epoch: int, split: str, values: Mapping[str, Any]) -> None:
    """One ``metrics.jsonl`` line and the TensorBoard scalars of an epoch's split (rank 0).

    The tags never name the stage (``val/accuracy`` in every run, on the global step), so
    a one-stage and a staged run overlay on one chart; ``train/stage`` says which stage a
    step belongs to. A stage's test metrics (``split="test"``, once, from its best
    weights) come with ``test/stage`` and ``test/epoch`` (the stage's best validation
    epoch) at the step where the stage ends.
    """
    if not run.dist.is_main:
        return
    line = {"stage": run.strategy.stages[index].name, "stage_index": index + 1, "epoch": epoch + 1, "split": split,
            "global_step": run.progress.global_step, **values}
    run.metric_lines.append(line)
    if split == "train":  # per-step train/loss and train/lr are logged while training
        scalars = {"accuracy": values["accuracy"], "epoch_loss": values["loss"]}
    else:
        scalars = {**metrics_lib.scalars(values), "loss": values["loss"]}
    if split == "test":
        scalars.update(stage=index + 1, epoch=epoch + 1)
    for name, value in scalars.items():
        run.tb.scalar(f"{split}/{name}", value, run.progress.global_step)


def record_step(run: Run, index: int, loss: float, rates: Mapping[str, float]) -> None:
    """The TensorBoard points of a training step: ``train/loss``, ``train/stage`` (1-based) and the rates."""
    step = run.progress.global_step
    run.tb.scalar("train/loss", loss, step)
    run.tb.scalar("train/stage", index + 1, step)
    record_rates(run, rates)


def record_rates(run: Run, rates: Mapping[str, float]) -> None:
    """TensorBoard learning rates: ``train/lr`` for one label group, ``train/lr/<label>`` for several."""
    if len(rates) == 1:
        run.tb.scalar("train/lr", next(iter(rates.values())), run.progress.global_step)
        return
    for label, value in rates.items():
        run.tb.scalar(f"train/lr/{label}", value, run.progress.global_step)


def log_input_grid(run: Run) -> None:
    """A grid of augmented training inputs of every class, labelled, as the model sees them.

    The images are the first of each class in the seeded order of the first epoch, drawn
    under their own seeded augmentation (``SeededAugmentation`` forks the RNG), so
    the grid is the same for a seed and training consumes exactly the same random numbers
    with or without it (``--no-tensorboard``).
    """
    if not run.tb.enabled:
        return
    classes = run.splits.classes
    order = train_order(run.data.train, seed=run.config.seed, epoch=0, rank=0, world_size=1)
    picks = pick_grid([int(v) for v in run.splits.train["label"]], order, classes, grid_per_class(len(classes)))
    images = torch.stack([run.data.train[i][0] for i, _ in picks])
    config = run.model.data_config
    run.tb.input_grid("inputs/augmented", images, [name for _, name in picks], config["mean"], config["std"], 0)


def save_best(run: Run, index: int, weights: Mapping[str, torch.Tensor] | None = None) -> None:
    """This stage's best-validation weights (kept in memory on every rank for the stage's
    test evaluation) and their file with the validation metrics (rank 0). ``weights``: what
    was validated when it is not the model's own state (``--ema``: the average's)."""
    progress, stages = run.progress, run.strategy.stages
    weights = weights if weights is not None else run.model.state_dict()
    run.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}
    if not run.dist.is_main:
        return
    directory = stage_dir(run, index)
    save_model(run.rundir, f"{directory}/best.safetensors", weights, {
        "cdft_spec": run.model.spec, "cdft_config": run.config.to_dict(), "cdft_classes": run.splits.classes,
        "cdft_plugins": run_plugins(run.config, run.model.spec), "cdft_stage": stages[index].name,
        "cdft_stage_index": index + 1, "cdft_epoch": progress.best_epoch,
        "cdft_world_size": run.dist.world_size,  # cdft eval lays its batches out as these processes did
    })
    _write_best_json(run, index)


def save_test_result(run: Run, index: int) -> None:
    """The stage's test metrics (evaluated once, from its best weights): best.json, the
    confusion matrix as CSV and in TensorBoard (rank 0)."""
    if not run.dist.is_main:
        return
    progress, classes = run.progress, run.splits.classes
    _write_best_json(run, index)
    matrix = progress.best_test["confusion_matrix"]
    run.rundir.write_text(f"{stage_dir(run, index)}/confusion_matrix.csv", metrics_lib.confusion_csv(matrix, classes))
    stages = run.strategy.stages
    title = (f"test confusion matrix — stage {index + 1}/{len(stages)} ({stages[index].name}), "
             f"weights of its best validation epoch {progress.best_epoch}")
    run.tb.confusion_matrix("test/confusion_matrix", matrix, classes, progress.global_step, title=title)


def _write_best_json(run: Run, index: int) -> None:
    p = run.progress
    best = {"stage": run.strategy.stages[index].name, "epoch": p.best_epoch, "val": p.best_val, "test": p.best_test}
    run.rundir.write_text(f"{stage_dir(run, index)}/best.json", json.dumps(best, indent=2))


def best_weights(run: Run, index: int) -> dict[str, torch.Tensor]:
    """Stage ``index``'s best-validation weights: from memory, or (after a resume) its file."""
    weights = run.best_weights
    if weights is None:
        name = f"{stage_dir(run, index)}/best.safetensors"
        weights = read_model(run.rundir.join(name))[0] if run.dist.is_main else None
        weights = broadcast_object(weights, run.dist)
    return {k: v.to(run.dist.device) for k, v in weights.items()}


def save_checkpoint(run: Run, optimizer: torch.optim.Optimizer, scaler: Any,
                    ema: Mapping[str, torch.Tensor] | None = None) -> None:
    """A complete resumable state (every rank's RNG and running sums, the ``--ema`` average
    included), the metrics and the log (rank 0)."""
    progress = run.progress
    per_rank = all_gather_objects((capture_rng(), progress.epoch_sums), run.dist)
    if run.dist.is_main:
        state = progress.record([sums for _, sums in per_rank], scaler.state_dict() if scaler is not None else None,
                                progress.elapsed + time.time() - run.started)
        save_resume(run.rundir, tag=resume_tag(progress.stage_index, progress.epoch, progress.step),
                    model_state=run.model.state_dict(), optimizer_state=optimizer.state_dict(),
                    rng_states=[rng for rng, _ in per_rank], progress=state, ema_state=ema)
        write_logs(run)
    barrier(run.dist)


def write_logs(run: Run) -> None:
    run.rundir.write_text("metrics.jsonl", "".join(json.dumps(line) + "\n" for line in run.metric_lines))
    run.rundir.write_text("train.log", run.log.text())
    run.tb.flush()


def stage_result(run: Run, index: int, epochs: int) -> dict[str, Any]:
    progress = run.progress
    stage = run.strategy.stages[index]
    return {
        "index": index + 1, "name": stage.name, "epochs": epochs, "lr": run.config.lr * stage.lr_factor,
        "init": stage.init, "best_epoch": progress.best_epoch, "val": progress.best_val, "test": progress.best_test,
        "checkpoint": f"{stage_dir(run, index)}/best.safetensors",
        # --patience: the epochs it trained, fewer than `epochs` when it stopped early
        "epochs_run": progress.epoch, "stopped_early": progress.epoch < epochs,
    }


def interrupted_message(run: Run) -> str:
    p = run.progress
    where = (f"at stage {p.stage_index + 1}, epoch {p.epoch + 1}, step {p.step}" if p.step
             else f"after stage {p.stage_index + 1}, epoch {p.epoch}")
    return f"stopped by SIGTERM {where}; the state is saved: continue with `cdft run --resume {run.rundir.url}`"


def write_summary(run: Run) -> dict[str, Any] | None:
    """The summary (rank 0): final test metrics at the best epoch, per stage results; written last."""
    if not run.dist.is_main:
        return None
    progress = run.progress
    final = progress.stages[-1]
    summary = {
        "status": "complete",
        "run_dir": run.rundir.url,
        "dataset": run.config.dataset,
        "protocol": run.splits.protocol,
        "backbone": run.config.backbone,
        "adapter": run.adapter,
        "strategy": run.strategy.name,
        "seed": run.config.seed,
        "classes": run.splits.classes,
        "images": {"train": len(run.splits.train), "val": len(run.splits.val), "test": len(run.splits.test)},
        "world_size": run.dist.world_size,
        "effective_batch": effective_batch(run),
        # epochs of frozen stages trained on N stored augmented views, cycled: an approximation (None: fresh every epoch)
        "train_views": run.config.train_views,
        "best_stage": final["name"],
        "best_epoch": final["best_epoch"],
        "val": final["val"],
        "test": final["test"],
        "checkpoint": final["checkpoint"],
        "stages": progress.stages,
        "elapsed_s": round(progress.elapsed + time.time() - run.started, 1),
    }
    classes = run.splits.classes
    run.rundir.write_text("confusion_matrix.csv", metrics_lib.confusion_csv(final["test"]["confusion_matrix"], classes))
    hparam_metrics = {f"test_{k}": v for k, v in metrics_lib.scalars(final["test"]).items()}
    hparam_metrics["val_accuracy"] = final["val"]["accuracy"]
    run.tb.hparams(run_hparams(run), hparam_metrics, progress.global_step)
    run.log(f"done in {summary['elapsed_s']:.0f} s: test accuracy {final['test']['accuracy']:.4f} at stage "
            f"{final['index']} epoch {final['best_epoch']}; best checkpoint {run.rundir.join(final['checkpoint'])}")
    write_logs(run)
    run.rundir.write_text("summary.json", json.dumps(summary, indent=2))
    run.rundir.remove(RESUME_DIR)  # a complete run cannot be resumed: drop its optimizer state
    return summary


def run_hparams(run: Run) -> dict[str, Any]:
    """What makes this run what it is, as resolved (the HParams tab's columns).

    Resolved means what was used, not what was asked: the backbone and adapter names the
    model was built with (``adapter`` unset means the strategy's default), its image
    size (unset means the backbone's), the adapter options with their defaults, the
    protocol, precision and device. Left out: paths (data root, split file, weight file,
    output), and what does not change the numbers (workers, logging, timeouts, evaluation
    batch, gradient checkpointing). Types follow
    :func:`~cdft_core.training.tensorboard_log.flatten_hparams` (None is left out).
    """
    config, spec, stages = run.config, run.model.spec, run.strategy.stages
    return {
        "dataset": config.dataset,
        "protocol": run.splits.protocol,
        "dataset_options": dict(config.dataset_options),
        "folds": config.folds,
        "val_fold": config.val_fold,
        "test_fold": config.test_fold,
        "num_classes": len(run.splits.classes),
        "backbone": spec["backbone"],
        "backbone_init": "file" if config.weights else "pretrained" if config.pretrained else "random",
        "adapter": spec["adapter"],
        "adapter_options": dict(spec.get("adapter_options") or {}),
        "image_size": spec["image_size"],
        "strategy": run.strategy.name,
        "strategy_options": dict(config.strategy_options),
        "stages": len(stages),
        "optimizer": config.optimizer,
        "lr": config.lr,
        "weight_decay": config.weight_decay,
        "batch_size": config.batch_size,
        "accumulate": config.accumulate,
        "effective_batch": effective_batch(run),
        "world_size": run.dist.world_size,
        "epochs": config.epochs,
        "total_epochs": sum(stage.epochs or config.epochs for stage in stages),
        "warmup_epochs": config.warmup_epochs,
        "warmup_start_factor": config.warmup_start_factor,
        "max_steps_per_epoch": config.max_steps_per_epoch,
        "augment": config.augment,
        "train_views": config.train_views,
        "class_weights": None if config.class_weights == "none" else config.class_weights,  # unset: left out
        "sampler": config.sampler,
        "patience": config.patience,
        "ema": config.ema,
        "seed": config.seed,
        "precision": run.precision,
        "device": torch.device(run.dist.device).type,
        "sync_batchnorm": config.sync_batchnorm,
    }


def effective_batch(run: Run) -> int:
    """Images per optimizer step: batch size × ``accumulate`` × processes."""
    return run.config.batch_size * run.config.accumulate * run.dist.world_size


def describe_effective_batch(run: Run) -> str:
    """The effective batch for the stage's log line, saying so when an epoch holds fewer images."""
    config, world = run.config, run.dist.world_size
    text = (f"{effective_batch(run)} ({config.batch_size} x {config.accumulate} accumulated x "
            f"{world} process{'es' if world > 1 else ''})")
    per_process = -(-len(run.data.train) // world)
    if config.batch_size * config.accumulate > per_process:
        text += f", at most {per_process * world} here: an epoch has {len(run.data.train)} training images"
    norms = run.model.training_batchnorms() if config.accumulate > 1 else []
    if norms:
        text += (f"; {len(norms)} BatchNorm layer{'s' if len(norms) > 1 else ''} in train mode normalise each "
                 f"micro-batch of {config.batch_size} on its own, so this is not quite the step of one batch of "
                 f"{config.batch_size * config.accumulate}")
    return text
