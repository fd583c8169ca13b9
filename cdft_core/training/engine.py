"""The training run of ``cdft run``, top to bottom: set up, train each stage, write the summary.

:func:`main` is the whole story. :func:`setup` builds the run — and, for ``--resume``,
settles everything about resuming there, so the stages never ask. :func:`train_stage`
labels the parameters, builds the stage's optimizer and trains its epochs with model
selection; :func:`train_epoch` is one pass over the training images.

Every feature and the config key (``cdft run --help`` option) that controls it:

- **Recipe** (docs/method.md#recipe): Adam (``optimizer``) with weight decay
  ``weight_decay``, peak learning rate ``lr``, ``batch_size`` per process, ``epochs`` per
  stage, a linear warm-up over ``warmup_epochs`` from ``warmup_start_factor``·lr, then
  cosine, per step; the schedule restarts with each stage. Each label group's rate
  follows docs/method.md#learning-rates. Image size and normalisation come from the
  backbone (``image_size`` overrides the size).
- **Strategy** (``strategy``, ``strategy_options``): a list of stages; each labels the
  parameters (frozen or trainable), gets a fresh optimizer and — in distributed runs — a
  freshly wrapped DDP model. A stage with ``init="best"`` (stage 2 of ``staged``) starts
  from the previous stage's best-validation weights. A strategy that changes the model
  (LoRA: ``Strategy.change_model``) does so once in setup, before any labelling or resume.
- **Model selection**: after each epoch the validation split is evaluated; when its
  accuracy is >= the best so far, the weights are saved and the test split is evaluated.
  The result is the test metrics at the best validation epoch of the last stage.
- **Metrics**: :mod:`cdft_core.training.evaluation` — the same numbers with 1 or N processes,
  patient-level ones where images have patients; each stage writes its best weights'
  per-image predictions (:mod:`cdft_core.training.predictions`).
- **Determinism** (``seed``): the seed fixes the split, the initialisation, the data order
  and every augmentation (:mod:`cdft_core.training.loaders`). ``--resume`` continues from
  the last saved state (after every epoch, and at the current step on SIGTERM) and ends
  with the same metrics as an uninterrupted run on CPU.
- **Distributed**: under torchrun every process trains on its share of each epoch, every
  process takes part in evaluation, and only rank 0 writes files. Collectives time out
  after ``dist_timeout`` seconds.
- **Precision** (``precision``): bf16 autocast by default on CUDA, fp16 with a grad scaler
  on request, fp32 on CPU. ``device`` picks cpu or cuda.
- **Speed on CUDA** (:mod:`cdft_core.training.speed`): channels_last for convolutional
  backbones, fused Adam(W), cuDNN autotuning, pinned memory and non-blocking copies;
  persistent loader workers (``num_workers``); ``compile`` for :func:`torch.compile`. None
  of it changes a CPU run's numbers.
- **Output** (``output`` or ``runs_dir``): :mod:`cdft_core.training.records` and
  :mod:`cdft_core.training.rundir`. ``summary.json`` is written last, by complete runs only.
- **Frozen-feature cache** (``feature_cache``, ``train_views``): while a stage's backbone
  is frozen, its validation and test outputs are computed once per stage and reused every
  epoch (exact), and with ``train_views`` N augmented views of the training images are
  stored and cycled (an approximation): :mod:`cdft_core.training.frozen`.
- **Quick runs**: ``max_steps_per_epoch`` caps the training steps of each epoch.
- **Class imbalance** (:mod:`cdft_core.training.balance`): ``class_weights`` ``balanced``
  weights the training loss by N/(K·n_class); ``sampler`` ``balanced`` draws each epoch's
  images with replacement, every class equally likely (seeded by seed and epoch).
- **Accumulation** (``accumulate``, :mod:`cdft_core.training.step`): one optimizer step per
  N batches, each weighted by its share of the step's images; the schedule, ``steps``,
  ``max_steps_per_epoch`` and ``log_every`` count optimizer steps.
- **Early stopping** (``patience``): a stage ends after N epochs without a strictly higher
  validation accuracy, then completes as usual (test on its best weights).
- **Weight averaging** (``ema``, :mod:`cdft_core.training.ema`): a moving average of the
  trainable weights is validated, selected and saved as ``best.safetensors``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time

import torch

from cdft_core.config import RunConfig, absolute_paths, resolve_device, resolve_precision
from cdft_core.data.root import ImageError
from cdft_core.errors import CdftError, Interrupted, UsageError
from cdft_core.training.balance import loss_weights
from cdft_core.training.checkpoint import restore_rng
from cdft_core.training.distributed import (
    any_rank,
    barrier,
    broadcast_buffers,
    init_distributed,
    mean_over_ranks,
    teardown,
    wrap_ddp,
)
from cdft_core.training.ema import StageEma, averaged, with_average
from cdft_core.training.evaluation import metrics_of
from cdft_core.training.faults import step_hook_from_env
from cdft_core.training.loaders import (
    SeededAugmentation,
    describe_num_workers,
    resolve_num_workers,
    steps_per_epoch,
    train_order,
)
from cdft_core.training.log import RunLog, progress_bar, stage_epoch
from cdft_core.training.optimizer import build_optimizer, build_scaler, optimizer_class, trainable_count
from cdft_core.training.predictions import best_predictions, evaluate_split, save_predictions
from cdft_core.training.preflight import check_memory, load_run_splits, preflight
from cdft_core.training.records import (
    best_weights,
    describe_effective_batch,
    effective_batch,
    interrupted_message,
    log_input_grid,
    record,
    record_step,
    save_best,
    save_checkpoint,
    save_test_result,
    stage_result,
    write_logs,
    write_summary,
)
from cdft_core.training.schedule import derive_seed, format_rates, lr_factor, rates, seed_everything, set_rates
from cdft_core.training.signals import StopRequest
from cdft_core.training.speed import compile_model, configure_backends, use_channels_last
from cdft_core.training.speed import describe as describe_speed
from cdft_core.training.state import Progress, Run, RunData, SavedState, StageRun, open_run_dir
from cdft_core.training.step import backward_step, optimizer_step, step_batches, warn_ungraded
from cdft_core.training.tensorboard_log import TensorBoardLog


def main(config: RunConfig, resume: str | None = None, argv: list[str] | None = None) -> dict | None:
    """Run every stage; returns the summary on rank 0 (None on other ranks)."""
    run = setup(config, resume, argv)
    try:
        for index in range(run.progress.stage_index, len(run.strategy.stages)):
            train_stage(run, index)
        summary = write_summary(run)
        barrier(run.dist)
        return summary
    except BaseException as exc:
        if run.dist.is_main:  # keep the log and metrics of what happened
            with contextlib.suppress(Exception):  # never hide the real error behind a logging failure
                write_logs(run)
        if isinstance(exc, KeyboardInterrupt):
            raise Interrupted(f"interrupted (Ctrl-C); continue from the last completed epoch with "
                              f"`cdft run --resume {run.rundir.url}`", exit_code=130) from None
        if isinstance(exc, ImageError):  # an image went bad after the split was made: the saved state stays
            raise _resumable(exc, run.rundir.url) from exc
        raise
    finally:
        run.stop.uninstall()
        run.tb.close()
        run.loaders.close()
        if run.features is not None:
            run.features.close()
        teardown()


# -- setup ------------------------------------------------------------------------------
def setup(config: RunConfig, resume: str | None = None, argv: list[str] | None = None) -> Run:
    """Join the process group, load data and model, create (or reopen and settle) the run directory."""
    from cdft_core.data.image_cache import cache_for_tables
    from cdft_core.data.images import ImageDataset
    from cdft_core.data.transforms import eval_transform, train_transform
    from cdft_core.models.model import build_model
    from cdft_core.models.model_change import change_model
    from cdft_core.models.weights import weights_origin
    from cdft_core.strategy import check_compatible

    config = absolute_paths(config)  # the saved config must work from any directory (resume, eval)
    strategy, adapter = preflight(config)
    config = dataclasses.replace(config, adapter=adapter)  # config.yaml names the adapter used, not None
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    if config.sync_batchnorm and device != "cuda":
        raise UsageError("--sync-batchnorm needs CUDA (SyncBatchNorm has no CPU kernel); drop it: on CPU every "
                         "rank still evaluates and saves rank 0's statistics")
    dist_info = init_distributed(device, config.dist_timeout)
    if device == "cuda":  # the CPU's memory was checked by preflight
        check_memory(config, strategy, str(dist_info.device))
    log = RunLog(dist_info.is_main)
    torch.set_float32_matmul_precision("high")
    configure_backends(dist_info.device)  # cuDNN autotuning on CUDA

    splits = load_run_splits(config)
    config = dataclasses.replace(config, dataset_options=dict(splits.options))  # what the rows are, defaults too
    seed_everything(config.seed)  # identical initial weights on every rank
    model = build_model(
        config.backbone, adapter, len(splits.classes), pretrained=config.pretrained, weights=config.weights,
        image_size=config.image_size, grad_checkpointing=config.grad_checkpointing,
        adapter_options=config.adapter_options,
    )
    change_model(model, strategy, config.strategy, config.strategy_options, log)  # e.g. LoRA: before labelling
    model = model.to(dist_info.device)
    check_compatible(strategy, model)
    if use_channels_last(model.backbone, dist_info.device):  # a ConvNeXt or ResNet on CUDA
        model = model.to(memory_format=torch.channels_last)
    if config.sync_batchnorm and dist_info.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if config.compile:
        model = compile_model(model, config.compile_mode)  # in place: the state dict keeps its keys

    cache = cache_for_tables(splits.root, [splits.train, splits.val, splits.test], model.data_config,  # --no-cache: None
                             cache_dir=config.cache_dir, progress=dist_info.is_main, log=log) if config.cache else None
    data = RunData(
        train=SeededAugmentation(ImageDataset(splits.root, splits.train,
                                              train_transform(model.data_config, config.augment), cache), config.seed),
        val=ImageDataset(splits.root, splits.val, eval_transform(model.data_config), cache),
        test=ImageDataset(splits.root, splits.test, eval_transform(model.data_config), cache),
    )
    # created after the images are cached: an unreadable image leaves no run directory behind
    rundir, saved, metric_lines = open_run_dir(config, resume, dist_info, log, argv or sys.argv, model.spec, splits)
    progress = saved.progress if saved is not None else Progress()
    tb = TensorBoardLog(rundir.join("tensorboard"), enabled=dist_info.is_main and config.tensorboard,
                        # events after the saved state are dropped; those at its step (the last completed epoch's) kept
                        purge_step=progress.global_step + 1 if resume else None)
    stop = StopRequest()
    stop.install()
    run = Run(config=config, dist=dist_info, rundir=rundir, splits=splits, model=model, strategy=strategy,
              adapter=adapter, data=data, precision=precision, tb=tb, log=log, stop=stop, progress=progress,
              metric_lines=metric_lines, after_step=step_hook_from_env(dist_info.rank))
    log(
        f"run {rundir.url}: {config.dataset} ({len(splits.train)} train / {len(splits.val)} val / "
        f"{len(splits.test)} test images, {len(splits.classes)} classes), {config.backbone} + {adapter}, "
        f"strategy {strategy.name} ({len(strategy.stages)} stage{'s' if len(strategy.stages) > 1 else ''}), "
        f"{dist_info.world_size} process{'es' if dist_info.distributed else ''} on {device}, {precision}"
    )
    log(f"backbone weights: {weights_origin(model.backbone)}")
    log(f"data loading: {describe_num_workers(config.num_workers)}")
    log("training step: " + describe_speed(
        dist_info.device, channels_last=use_channels_last(model.backbone, dist_info.device),
        optimizer_cls=optimizer_class(config), workers=resolve_num_workers(config.num_workers), compiled=config.compile,
        compile_mode=config.compile_mode))
    for name in ("val", "test"):
        missing = sorted(set(splits.classes) - {splits.classes[i] for i in getattr(splits, name)["label"]})
        if missing:
            log(f"warning: the {name} split has no image of {', '.join(missing)}; its macro metrics are over "
                f"the other classes (docs/method.md#metrics)")
    if saved is not None:
        _settle_resume(run, saved)
    elif not resume:
        try:
            log_input_grid(run)  # rank 0 with TensorBoard on; consumes no random number of training's
        except ImageError as exc:
            raise _resumable(exc, rundir.url) from exc
    return run


def _resumable(exc: ImageError, url: str) -> CdftError:
    """The error of a bad image met during the run, saying how to go on from the last saved state."""
    return CdftError(f"{exc}, then continue with `cdft run --resume {url}`")


def _settle_resume(run: Run, saved: SavedState) -> None:
    """Restore a saved state: weights, this rank's RNG and running sums, the interrupted
    stage's optimizer state and moving average (for their builders) — or, when the state
    was saved after a stage's last epoch (or its early stop), complete that stage and move on."""
    progress, index = run.progress, run.progress.stage_index
    saved.load_weights(run.model, run.dist.device)
    if progress.step:  # saved in the middle of an epoch (SIGTERM)
        restore_rng(*saved.rng[run.dist.rank])
        progress.epoch_sums = dict(saved.epoch_sums[run.dist.rank])
    elif progress.best_epoch == progress.epoch:  # saved at a best epoch: make sure its files exist
        save_best(run, index, with_average(run.model.state_dict(), saved.ema))  # --ema: the average was validated
    epochs = _stage_epochs(run, index)
    if progress.stage_done(epochs, run.config.patience):
        _complete_stage(run, index, epochs)
    else:
        run.saved_optimizer, run.saved_scaler, run.saved_ema = saved.optimizer, saved.scaler, saved.ema


# -- one stage ------------------------------------------------------------------------
def train_stage(run: Run, index: int) -> None:
    """Train one stage: labels, optimizer and DDP wrapper, then epochs with model selection."""
    from cdft_core.strategy import apply_stage
    from cdft_core.training.frozen import stage_features

    config, progress, model = run.config, run.progress, run.model
    stage = run.strategy.stages[index]
    labels = apply_stage(model, stage)
    run.features = stage_features(run, index)  # a frozen backbone: val/test (and --train-views) from the cache
    saved_optimizer, saved_scaler, saved_ema = run.take_saved()
    steps = steps_per_epoch(len(run.data.train), run.dist.world_size, config.batch_size, config.max_steps_per_epoch,
                            config.accumulate)
    epochs = _stage_epochs(run, index)
    probe = torch.stack([run.data.val[0][0]] * 2)
    current = StageRun(
        index=index, epochs=epochs, steps=steps, warmup=round(config.warmup_epochs * steps),
        optimizer=build_optimizer(model, labels, stage, config, saved_optimizer),
        scaler=build_scaler(run.precision, saved_scaler),
        model=wrap_ddp(model, run.dist, probe, run.precision, run.log),
        ema=StageEma(model, config.ema, saved_ema) if config.ema else None,  # from the stage's start (or saved)
        class_weights=loss_weights(config.class_weights, run.splits.train["label"].tolist(), run.splits.classes, run.log,
                                   sampler=config.sampler),
    )
    run.log(
        f"stage {index + 1}/{len(run.strategy.stages)} {stage.name}: {epochs} epochs x {steps} steps, "
        f"{format_rates(rates(current.optimizer, peak=True))}, {trainable_count(current.optimizer):,} trainable parameters, "
        f"effective batch {describe_effective_batch(run)}"
        + (f", from stage {index}'s best weights" if stage.init == "best" else "")
    )
    for epoch in range(progress.epoch, epochs):
        train_loss, train_acc = train_epoch(run, current, epoch)
        record(run, index, epoch, "train", {"loss": train_loss, "accuracy": train_acc,
                                            "lr": current.optimizer.param_groups[0]["lr"],
                                            "lr_groups": rates(current.optimizer)})
        broadcast_buffers(model, run.dist)  # every rank evaluates the model rank 0 saves
        where = stage_epoch(index + 1, len(run.strategy.stages), epoch + 1, epochs)
        with averaged(current.ema):  # --ema: the average is what is validated and selected
            val = evaluate_split(run, "val", f"{where} val")
        record(run, index, epoch, "val", val)
        is_best = progress.note_validation(val, epoch)
        progress.epoch, progress.step, progress.epoch_sums = epoch + 1, 0, {}
        run.log(
            f"stage {index + 1} epoch {epoch + 1}/{epochs}: train loss {train_loss:.4f} acc {train_acc:.4f} | "
            f"val acc {val['accuracy']:.4f} | best val {progress.best_accuracy:.4f} (epoch {progress.best_epoch})"
        )
        average = current.ema.state_dict() if current.ema is not None else None
        save_checkpoint(run, current.optimizer, current.scaler, average)
        if is_best:  # after the resume state: a best file is never newer than the state that knows it
            save_best(run, index, with_average(model.state_dict(), average))
        if any_rank(run.stop.requested, run.dist):
            raise Interrupted(interrupted_message(run))
        if progress.stage_done(epochs, config.patience) and progress.epoch < epochs:
            run.log(f"stage {index + 1}: no higher validation accuracy for {config.patience} epoch"
                    f"{'s' if config.patience > 1 else ''} (--patience): stopping early after epoch {epoch + 1} of {epochs}")
            break
    _complete_stage(run, index, epochs)


def _stage_epochs(run: Run, index: int) -> int:
    return run.strategy.stages[index].epochs or run.config.epochs


def _complete_stage(run: Run, index: int, epochs: int) -> None:
    """Evaluate the test split once, with the stage's best-validation weights (and val again,
    for ``predictions.csv``: :mod:`cdft_core.training.predictions`); record the stage's
    result and start the next one (from those weights if it says so)."""
    stages, model = run.strategy.stages, run.model
    continues = index + 1 < len(stages) and stages[index + 1].init == "start"  # from the last epoch's weights
    current = {k: v.detach().clone() for k, v in model.state_dict().items()} if continues else None
    model.load_state_dict(best_weights(run, index))
    outputs = best_predictions(run, index)
    run.progress.best_test = metrics_of(outputs["test"], run.splits.classes, run.splits.groups("test"))
    record(run, index, run.progress.best_epoch - 1, "test", run.progress.best_test)
    save_test_result(run, index)
    save_predictions(run, index, outputs)
    run.log(f"stage {index + 1} {stages[index].name}: test accuracy {run.progress.best_test['accuracy']:.4f} "
            f"at the best validation epoch {run.progress.best_epoch}")
    run.progress.stages.append(stage_result(run, index, epochs))
    run.progress.start_stage(index + 1)
    run.best_weights = None
    if run.features is not None:  # the next stage computes (or finds) its own
        run.features.close()
        run.features = None
    if current is not None:
        model.load_state_dict(current)
    elif index + 1 < len(stages):
        run.log(f"stage {index + 2} starts from stage {index + 1}'s best weights")


def train_epoch(run: Run, current: StageRun, epoch: int) -> tuple[float, float]:
    """One pass over this rank's share of the training set; returns mean loss and accuracy."""
    config, progress, dist_info, index = run.config, run.progress, run.dist, current.index
    global_epoch = sum(_stage_epochs(run, i) for i in range(index)) + epoch
    run.data.train.epoch = global_epoch
    start = progress.step  # > 0 only when resuming a SIGTERM state
    if start == 0:
        seed_everything(derive_seed(config.seed, "train", global_epoch, dist_info.rank))  # dropout etc.
    step_images = config.batch_size * config.accumulate  # per optimizer step and process
    order = train_order(run.data.train, seed=config.seed, epoch=global_epoch, rank=dist_info.rank,
                        world_size=dist_info.world_size, sampler=config.sampler, labels=run.data.train.dataset.labels,
                        max_images=config.max_steps_per_epoch and config.max_steps_per_epoch * step_images)
    if run.features is not None and run.features.train is not None:  # --train-views: stored views, no images
        loader = run.features.train.batches(order[start * step_images:], config.batch_size, global_epoch)
    else:  # one loader for the whole run (persistent workers); each key carries its epoch for the augmentation
        loader = run.loaders.train(run.data.train, order[start * step_images:], global_epoch,
                                   config.batch_size, config.num_workers, derive_seed(config.seed, "loader"),
                                   dist_info.device)
    channels_last = use_channels_last(run.model.backbone, dist_info.device)
    sums = progress.epoch_sums or {"loss": 0.0, "correct": 0, "count": 0}
    window: list[float] = []
    current.model.train()
    bar = progress_bar(dist_info.is_main, current.steps, start,
                       stage_epoch(index + 1, len(run.strategy.stages), epoch + 1, current.epochs))
    tick = epoch_start = time.time()
    for step, batches in enumerate(step_batches(loader, config.accumulate), start=start):  # --accumulate N batches
        set_rates(current.optimizer, lr_factor(epoch * current.steps + step, current.warmup, current.total_steps,
                                               config.warmup_start_factor))
        result = backward_step(current.model, current.optimizer, batches, device=dist_info.device,
                               channels_last=channels_last, precision=run.precision, scaler=current.scaler,
                               class_weights=current.class_weights)
        if epoch == step == 0:  # a stage's first step: a trainable parameter no gradient reached never trains
            warn_ungraded(current.optimizer, run.log, index)
        if any_rank(not math.isfinite(result.loss), dist_info):
            raise CdftError(
                f"the training loss is not finite (nan or inf) at stage {index + 1}, epoch {epoch + 1}, step {step + 1}; "
                f"try a lower --lr, --precision fp32 or bf16, or check the images for corrupt values"
            )
        optimizer_step(current.optimizer, current.scaler)
        if current.ema is not None:
            current.ema.update()
        progress.global_step += 1
        progress.step = step + 1
        loss_value = result.loss
        sums["loss"] += result.loss_sum
        sums["correct"] += result.correct
        sums["count"] += result.count
        window.append(loss_value)
        if run.after_step is not None:
            run.after_step(index + 1, epoch + 1, step + 1)
        if (step + 1) % config.log_every == 0 or step + 1 == current.steps:
            mean_loss = mean_over_ranks(sum(window), len(window), dist_info)
            record_step(run, index, mean_loss, rates(current.optimizer))
            if bar is None:
                rate = len(window) * effective_batch(run) / max(time.time() - tick, 1e-9)
                run.log(f"stage {index + 1} epoch {epoch + 1} step {step + 1}/{current.steps}: loss {mean_loss:.4f}, "
                        f"{format_rates(rates(current.optimizer))}, {rate:.1f} img/s")
            window, tick = [], time.time()
        if bar is not None:
            bar.update(1)
            seen = (step + 1 - start) * effective_batch(run)
            bar.set_postfix({"loss": f"{loss_value:.4f}", "lr": f"{current.optimizer.param_groups[0]['lr']:.2e}",
                             "img/s": f"{seen / max(time.time() - epoch_start, 1e-9):.1f}"})
        if step + 1 < current.steps and any_rank(run.stop.requested, dist_info):
            progress.epoch_sums = dict(sums)
            save_checkpoint(run, current.optimizer, current.scaler, current.ema and current.ema.state_dict())
            raise Interrupted(interrupted_message(run))
    if bar is not None:
        bar.close()
    return (mean_over_ranks(sums["loss"], sums["count"], dist_info),
            mean_over_ranks(float(sums["correct"]), sums["count"], dist_info))
