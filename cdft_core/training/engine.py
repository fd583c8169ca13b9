"""The training run of ``cdft run``, top to bottom: setup, train each stage, evaluate, save, clean up.

Every feature and the config key (``cdft run --help`` option) that controls it:

- **Recipe** (SPEC §5): Adam (``optimizer``) with weight decay ``weight_decay``, peak
  learning rate ``lr``, ``batch_size`` per process, ``epochs`` per stage, a linear warm-up
  over ``warmup_epochs`` from ``warmup_start_factor``·lr, then cosine, per step; the
  schedule restarts with each stage. Image size and normalisation come from the backbone
  (``image_size`` overrides the size).
- **Strategy** (``strategy``, ``strategy_options``): a list of stages; each labels the
  parameters (frozen or trainable), gets a fresh optimizer and — in distributed runs — a
  freshly wrapped DDP model. A stage with ``init="best"`` (stage 2 of ``staged``) starts
  from the previous stage's best-validation weights.
- **Model selection**: after each epoch the validation split is evaluated; when its
  accuracy is >= the best so far, the weights are saved and the test split is evaluated.
  The result is the test metrics at the best validation epoch of the last stage.
- **Metrics** are computed once, with scikit-learn, on the predictions gathered from every
  process with the sampler's padding dropped: the same numbers with 1 or N processes.
- **Determinism** (``seed``): the seed fixes the split, the initialisation, the data order
  (a function of seed and epoch) and every augmentation (a function of seed, epoch and
  image). ``cdft run --resume RUN`` continues from the last saved state (saved after every
  epoch, and at the current step on SIGTERM) and ends with the same metrics as an
  uninterrupted run on CPU.
- **Distributed**: under torchrun every process trains on its share of each epoch
  (``DistributedSampler``), every process takes part in evaluation, and only rank 0
  writes files. Collectives time out after ``dist_timeout`` seconds.
- **Precision** (``precision``): bf16 autocast by default on CUDA, fp16 with a grad scaler
  on request, fp32 on CPU. ``device`` picks cpu or cuda.
- **Output** (``output`` or ``runs_dir``): see :mod:`cdft_core.training.rundir` for the layout;
  TensorBoard (``tensorboard``) gets per-step loss and learning rate every ``log_every``
  steps, per-epoch metrics, the confusion matrix at each best epoch, a grid of augmented
  inputs and the hparams summary. ``summary.json`` is written last, by complete runs only.
- **Quick runs**: ``max_steps_per_epoch`` caps the training steps of each epoch.

Test hook (tests only, never set it in real runs): ``CDFT_TEST_FAULT`` makes one rank fail
at a chosen step, to check that a failure ends the job promptly and that a run killed
mid-epoch resumes exactly. Its value is ``rank=R,stage=S,epoch=E,step=N,action=A``
(1-based stage, epoch and step; ``rank`` optional) with ``A`` = ``raise`` (raise an
error), ``stall`` (print ``cdft-test-fault: stalled`` on stderr and wait to be killed) or
``sigterm`` (send itself SIGTERM, like a preempting scheduler).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cdft_core.config import RunConfig, absolute_paths, dump_yaml, resolve_device, resolve_precision
from cdft_core.errors import CdftError, UsageError
from cdft_core.training import metrics as metrics_lib
from cdft_core.training.checkpoint import (
    RESUME_DIR,
    capture_rng,
    latest_resume,
    read_model,
    restore_rng,
    resume_tag,
    save_model,
    save_resume,
)
from cdft_core.training.distributed import (
    DistInfo,
    all_gather_objects,
    any_rank,
    barrier,
    broadcast_object,
    gather_predictions,
    init_distributed,
    mean_over_ranks,
    teardown,
)
from cdft_core.training.launch import Interrupted
from cdft_core.training.rundir import RunDir, auto_name, create_run_dir, environment_info, open_existing
from cdft_core.training.tensorboard_log import TensorBoardLog

FAULT_ENV = "CDFT_TEST_FAULT"


# -- checks before any work -------------------------------------------------------------
def preflight(config: RunConfig) -> tuple[Any, str]:
    """Resolve every name and option through the registry; returns (strategy, adapter name).

    Cheap (no data, no model): the CLI calls it before launching processes so that a typo
    costs a second, not a cluster allocation.
    """
    from cdft_core.data.datasets import build_dataset
    from cdft_core.registry import get_registry
    from cdft_core.strategy import build_strategy, check_adapter

    registry = get_registry()
    build_dataset(config.dataset, config.dataset_options, registry)
    registry.get("backbone", config.backbone)
    strategy = build_strategy(config.strategy, config.strategy_options, registry=registry)
    adapter = config.adapter or strategy.default_adapter
    registry.get("adapter", adapter)
    check_adapter(strategy, adapter, registry=registry)
    return strategy, adapter


def load_run_splits(config: RunConfig) -> Any:
    """The run's train/val/test tables (folds checked, none empty); reads the split file or scans the root."""
    from cdft_core.data.datasets import load_splits

    splits = load_splits(
        config.dataset, config.data_root, split_file=config.split_file, val_fold=config.val_fold,
        test_fold=config.test_fold, protocol=config.protocol, options=config.dataset_options,
        folds=config.folds, seed=config.seed,
    )
    for name in ("train", "val", "test"):
        if len(getattr(splits, name)) == 0:
            raise UsageError(f"the {name} split is empty (val fold {config.val_fold}, test fold {config.test_fold}); check the folds")
    return splits


# -- small pieces the run is made of -------------------------------------------------------
def derive_seed(*parts: Any) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (e.g. seed, purpose, epoch, index)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def lr_factor(step: int, warmup_steps: int, total_steps: int, start_factor: float) -> float:
    """The paper's schedule: linear warm-up from ``start_factor`` to 1, then cosine from step 0.

    ``0.5·(1 + cos(π·step/total))`` counts steps from the first epoch, as in SPEC §5.
    """
    if step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


class SeededAugmentation(torch.utils.data.Dataset):
    """Train-time images whose random augmentation depends only on (seed, epoch, index).

    Each item is drawn under a forked RNG seeded from those three numbers, so the
    augmentation does not depend on the number of processes or loader workers, and a run
    resumed in the middle of an epoch sees exactly the images it would have seen.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, "augment", self.epoch, int(index)))
            return self.dataset[index]


class WithIndex(torch.utils.data.Dataset):
    """``(image, label, index)``: evaluation keeps track of which image each prediction is for."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image, label = self.dataset[index]
        return image, label, index


class StopRequest:
    """Set by SIGTERM (preemption); the training loop checks it between steps."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: Any = None

    def install(self) -> None:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. embedded): no preemption handling
            self._previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    @property
    def requested(self) -> bool:
        return self.signal is not None


@dataclass(frozen=True)
class Fault:
    """A failure injected by tests through ``CDFT_TEST_FAULT`` (see the module docstring)."""

    stage: int
    epoch: int
    step: int
    action: str
    rank: int | None = None

    @classmethod
    def from_env(cls) -> Fault | None:
        raw = os.environ.get(FAULT_ENV)
        if not raw:
            return None
        fields_ = dict(part.split("=", 1) for part in raw.split(",") if "=" in part)
        return cls(
            stage=int(fields_.get("stage", 1)),
            epoch=int(fields_.get("epoch", 1)),
            step=int(fields_.get("step", 1)),
            action=fields_.get("action", "raise"),
            rank=int(fields_["rank"]) if "rank" in fields_ else None,
        )

    def check(self, rank: int, stage: int, epoch: int, step: int) -> None:
        if (self.rank is not None and rank != self.rank) or (stage, epoch, step) != (self.stage, self.epoch, self.step):
            return
        if self.action == "stall":
            print("cdft-test-fault: stalled", file=sys.stderr, flush=True)
            while True:
                time.sleep(1)
        if self.action == "sigterm":  # as a preempting scheduler would
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise CdftError(f"injected test fault on rank {rank} at stage {stage} epoch {epoch} step {step} ({FAULT_ENV})")


class RunLog:
    """Log lines of rank 0: on stderr, and kept for ``train.log`` in the run directory."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.previous = ""  # train.log of the run being resumed
        self.lines: list[str] = []

    def text(self) -> str:
        return self.previous + "".join(line + "\n" for line in self.lines)

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"{time.strftime('%H:%M:%S')} {message}"
        self.lines.append(line)
        print(f"cdft: {message}", file=sys.stderr, flush=True)


@dataclass
class Progress:
    """Where the run stands. Saved in every resume state; ``--resume`` restores it."""

    stage_index: int = 0  # the stage being trained (0-based)
    epoch: int = 0  # completed epochs of that stage
    step: int = 0  # completed steps of the epoch in progress (only SIGTERM states have > 0)
    global_step: int = 0  # optimizer steps over the whole run (the TensorBoard x axis)
    best_accuracy: float | None = None  # best validation accuracy of this stage
    best_epoch: int | None = None
    best_val: dict | None = None  # validation metrics at the best epoch
    best_test: dict | None = None  # test metrics at the best epoch
    epoch_sums: dict = field(default_factory=dict)  # this rank's running train loss/accuracy of the epoch in progress
    stages: list = field(default_factory=list)  # results of the finished stages
    elapsed: float = 0.0  # seconds of training before this process started

    def start_stage(self, index: int) -> None:
        self.stage_index, self.epoch, self.step = index, 0, 0
        self.best_accuracy = self.best_epoch = self.best_val = self.best_test = None
        self.epoch_sums = {}


@dataclass
class Run:
    """Everything :func:`setup` builds and the stages use."""

    config: RunConfig
    dist: DistInfo
    rundir: RunDir
    splits: Any
    model: Any
    strategy: Any
    adapter: str
    train_set: SeededAugmentation
    val_set: torch.utils.data.Dataset
    test_set: torch.utils.data.Dataset
    precision: str
    tb: TensorBoardLog
    log: RunLog
    stop: StopRequest
    fault: Fault | None
    progress: Progress
    resume_state: dict | None  # the loaded resume state, consumed by the first stage trained
    metric_lines: list[dict]
    started: float
    best_weights: dict | None = None  # the stage's best weights, kept when the next stage starts from them


# -- setup ------------------------------------------------------------------------------
def setup(config: RunConfig, resume: str | None = None, argv: list[str] | None = None) -> Run:
    """Join the process group, load data and model, create (or reopen) the run directory."""
    from cdft_core.data.images import ImageDataset
    from cdft_core.data.transforms import eval_transform, train_transform
    from cdft_core.models.model import build_model
    from cdft_core.strategy import check_compatible

    config = absolute_paths(config)  # the saved config must work from any directory (resume, eval)
    strategy, adapter = preflight(config)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    dist_info = init_distributed(device, config.dist_timeout)
    log = RunLog(dist_info.is_main)
    torch.set_float32_matmul_precision("high")

    splits = load_run_splits(config)
    seed_everything(config.seed)  # identical initial weights on every rank
    model = build_model(
        config.backbone, adapter, len(splits.classes), pretrained=config.pretrained, weights=config.weights,
        image_size=config.image_size, grad_checkpointing=config.grad_checkpointing,
        adapter_options=config.adapter_options,
    ).to(dist_info.device)
    check_compatible(strategy, model)

    rundir, resume_state, progress, metric_lines = _open_run_dir(config, resume, dist_info, log, argv or sys.argv)
    tb = TensorBoardLog(
        rundir.join("tensorboard"), enabled=dist_info.is_main and config.tensorboard,
        purge_step=progress.global_step if resume else None,
    )
    train_set = SeededAugmentation(ImageDataset(splits.root, splits.train, train_transform(model.data_config)), config.seed)
    val_set = ImageDataset(splits.root, splits.val, eval_transform(model.data_config))
    test_set = ImageDataset(splits.root, splits.test, eval_transform(model.data_config))
    stop = StopRequest()
    stop.install()
    run = Run(
        config=config, dist=dist_info, rundir=rundir, splits=splits, model=model, strategy=strategy, adapter=adapter,
        train_set=train_set, val_set=val_set, test_set=test_set, precision=precision, tb=tb, log=log, stop=stop,
        fault=Fault.from_env(), progress=progress, resume_state=resume_state, metric_lines=metric_lines,
        started=time.time(),
    )
    log(
        f"run {rundir.url}: {config.dataset} ({len(splits.train)} train / {len(splits.val)} val / "
        f"{len(splits.test)} test images, {len(splits.classes)} classes), {config.backbone} + {adapter}, "
        f"strategy {strategy.name} ({len(strategy.stages)} stage{'s' if len(strategy.stages) > 1 else ''}), "
        f"{dist_info.world_size} process{'es' if dist_info.distributed else ''} on {device}, {precision}"
    )
    if resume_state is None and tb.enabled:
        _log_input_grid(run)
    return run


def _open_run_dir(config: RunConfig, resume: str | None, dist_info: DistInfo, log: RunLog,
                  argv: list[str]) -> tuple[RunDir, dict | None, Progress, list[dict]]:
    """Rank 0 creates the run directory (or reopens it to resume) and tells the others where it is."""
    if resume:
        rundir = open_existing(resume)
        if rundir.exists("summary.json"):
            raise UsageError(f"run {resume!r} is complete (it has summary.json); nothing to resume")
        state = latest_resume(rundir) if dist_info.is_main else None
        state = broadcast_object(state, dist_info)
        if dist_info.is_main and rundir.exists("train.log"):
            log.previous = rundir.read_text("train.log")
        if dist_info.is_main:  # the same run, perhaps with its data found elsewhere now (cli.run.RESUME_OVERRIDES)
            rundir.write_text("config.yaml", dump_yaml(config))
        if state is None:
            progress, lines = Progress(), []
            log(f"resuming {rundir.url}: no saved state yet, starting from the beginning")
        else:
            known = {f.name for f in fields(Progress)} - {"epoch_sums"}  # per rank: restored by train_stage
            progress = Progress(**{k: v for k, v in state["progress"].items() if k in known})
            lines = _metric_lines_until(rundir, progress) if dist_info.is_main else []
            log(f"resuming {rundir.url} after stage {progress.stage_index + 1}, epoch {progress.epoch}"
                + (f" and {progress.step} steps of epoch {progress.epoch + 1}" if progress.step else ""))
            if progress.step and len(state["rng"]) != dist_info.world_size:
                raise UsageError(
                    f"this state was saved in the middle of an epoch by {len(state['rng'])} processes; "
                    f"resume it with the same number of processes"
                )
        return rundir, state, progress, lines
    url = None
    if dist_info.is_main:
        name = auto_name(config.dataset, config.backbone, config.strategy, config.val_fold, config.test_fold, config.seed)
        rundir = create_run_dir(config.output, config.runs_dir, name)
        rundir.write_text("config.yaml", dump_yaml(config))
        rundir.write_text("environment.json", json.dumps(environment_info(list(argv), dist_info.world_size), indent=2))
        url = rundir.url
    url = broadcast_object(url, dist_info)
    return RunDir(url), None, Progress(), []


def _metric_lines_until(rundir: RunDir, progress: Progress) -> list[dict]:
    """The metric lines of the epochs a resume state covers (a killed run may have written more)."""
    if not rundir.exists("metrics.jsonl"):
        return []
    lines = [json.loads(line) for line in rundir.read_text("metrics.jsonl").splitlines() if line.strip()]
    done = (progress.stage_index + 1, progress.epoch)
    return [line for line in lines if (line["stage_index"], line["epoch"]) <= done]


def _log_input_grid(run: Run) -> None:
    """A few augmented training inputs, as the model sees them (first epoch, first images)."""
    count = min(16, len(run.train_set))
    images = torch.stack([run.train_set[i][0] for i in range(count)])
    config = run.model.data_config
    run.tb.input_grid("inputs/augmented", images, config["mean"], config["std"], 0)


# -- one stage ------------------------------------------------------------------------
def stage_dir(run: Run, index: int) -> str:
    """``stage1-frt``: the stage's sub-directory (checkpoints, confusion matrix)."""
    return f"stage{index + 1}-{run.strategy.stages[index].name}"


def _tag(run: Run, index: int, name: str) -> str:
    """TensorBoard tags are separated per stage when a strategy has several."""
    return f"{stage_dir(run, index)}/{name}" if len(run.strategy.stages) > 1 else name


def train_stage(run: Run, index: int) -> None:
    """Train one stage: labels, fresh optimizer and DDP wrapper, epochs with model selection."""
    from cdft_core.strategy import apply_stage, param_groups

    config, progress, model = run.config, run.progress, run.model
    stage = run.strategy.stages[index]
    state, run.resume_state = run.resume_state, None
    resuming = state is not None and progress.stage_index == index and (progress.epoch or progress.step)
    if not resuming:
        progress.start_stage(index)
        if stage.init == "best":
            model.load_state_dict(_previous_best(run, index))
    else:
        model.load_state_dict({k: v.to(run.dist.device) for k, v in state["model"].items()})
        if progress.step == 0 and progress.best_epoch == progress.epoch:
            save_best(run, index)  # the state was saved at a best epoch: make sure its files exist
    epochs = stage.epochs or config.epochs
    if progress.epoch >= epochs:  # resumed from the state saved after this stage's last epoch
        progress.stages.append(_stage_result(run, index, epochs))
        return

    labels = apply_stage(model, stage)
    groups = param_groups(model, labels, stage, config.lr, config.weight_decay)
    optimizer_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_cls(groups, lr=config.lr)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    if resuming:
        optimizer.load_state_dict(state["optimizer"])
    ddp_model = _wrap(run, model)
    scaler = torch.amp.GradScaler("cuda") if run.precision == "fp16" else None
    if resuming and scaler is not None and state["progress"].get("scaler"):
        scaler.load_state_dict(state["progress"]["scaler"])
    if resuming and progress.step:  # in the middle of an epoch: this rank's RNG streams and running sums
        restore_rng(*state["rng"][run.dist.rank])
        progress.epoch_sums = dict(state["progress"]["epoch_sums"][run.dist.rank])

    steps = _steps_per_epoch(run)
    warmup = round(config.warmup_epochs * steps)
    trainable = sum(p.numel() for g in groups for p in g["params"])
    run.log(
        f"stage {index + 1}/{len(run.strategy.stages)} {stage.name}: {epochs} epochs x {steps} steps, "
        f"lr {config.lr * stage.lr_factor:.3g}, {trainable:,} trainable parameters"
        + (f", from stage {index}'s best weights" if stage.init == "best" else "")
    )
    for epoch in range(progress.epoch, epochs):
        train_loss, train_acc = train_epoch(run, index, epoch, ddp_model, optimizer, scaler, steps, warmup, epochs * steps)
        _record(run, index, epoch, "train", {"loss": train_loss, "accuracy": train_acc, "lr": optimizer.param_groups[0]["lr"]})
        val = evaluate(model, run.val_set, run.splits.classes, run.dist, _eval_batch(config), config.num_workers, run.precision)
        _record(run, index, epoch, "val", val)
        is_best = progress.best_accuracy is None or val["accuracy"] >= progress.best_accuracy
        if is_best:
            test = evaluate(model, run.test_set, run.splits.classes, run.dist, _eval_batch(config), config.num_workers, run.precision)
            _record(run, index, epoch, "test", test)
            progress.best_accuracy, progress.best_epoch = val["accuracy"], epoch + 1
            progress.best_val, progress.best_test = val, test
        progress.epoch, progress.step, progress.epoch_sums = epoch + 1, 0, {}
        run.log(
            f"stage {index + 1} epoch {epoch + 1}/{epochs}: train loss {train_loss:.4f} acc {train_acc:.4f} | "
            f"val acc {val['accuracy']:.4f} | best val {progress.best_accuracy:.4f} (epoch {progress.best_epoch}), "
            f"test acc {progress.best_test['accuracy']:.4f}"
        )
        save_checkpoint(run, optimizer, scaler)
        if is_best:  # after the resume state: a best file is never newer than the state that knows it
            save_best(run, index)
        if any_rank(run.stop.requested, run.dist):
            raise Interrupted(_interrupted_message(run))
    progress.stages.append(_stage_result(run, index, epochs))
    del ddp_model  # the next stage wraps the model afresh


def train_epoch(run: Run, index: int, epoch: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scaler: Any, steps: int, warmup: int, total: int) -> tuple[float, float]:
    """One pass over this rank's share of the training set; returns mean loss and accuracy."""
    config, progress, dist_info = run.config, run.progress, run.dist
    global_epoch = sum((s.epochs or config.epochs) for s in run.strategy.stages[:index]) + epoch
    run.train_set.epoch = global_epoch
    start = progress.step  # > 0 only when resuming a SIGTERM state
    if start == 0:
        seed_everything(derive_seed(config.seed, "train", global_epoch, dist_info.rank))  # dropout etc.
    indices = _train_indices(run, global_epoch)[start * config.batch_size:]
    loader = _loader(run.train_set, indices, config.batch_size, config.num_workers, derive_seed(config.seed, global_epoch))
    sums = progress.epoch_sums or {"loss": 0.0, "correct": 0, "count": 0}
    window: list[float] = []
    model.train()
    bar = _progress_bar(run, steps, start, f"stage {index + 1} epoch {epoch + 1}")
    tick = time.time()
    for step, (images, labels) in enumerate(loader, start=start):
        images = images.to(dist_info.device, non_blocking=True)
        labels = labels.to(dist_info.device, non_blocking=True)
        factor = lr_factor(epoch * steps + step, warmup, total, config.warmup_start_factor)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        with _autocast(run.precision, dist_info.device):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        progress.global_step += 1
        progress.step = step + 1
        loss_value = loss.item()
        sums["loss"] += loss_value * labels.shape[0]
        sums["correct"] += int((logits.detach().argmax(1) == labels).sum())
        sums["count"] += int(labels.shape[0])
        window.append(loss_value)
        if run.fault is not None:
            run.fault.check(dist_info.rank, index + 1, epoch + 1, step + 1)
        stage_lr = config.lr * run.strategy.stages[index].lr_factor * factor
        if (step + 1) % config.log_every == 0 or step + 1 == steps:
            mean_loss = mean_over_ranks(sum(window), len(window), dist_info)
            run.tb.scalar(_tag(run, index, "train/loss"), mean_loss, progress.global_step)
            run.tb.scalar(_tag(run, index, "train/lr"), stage_lr, progress.global_step)
            if bar is None:
                rate = len(window) * config.batch_size * dist_info.world_size / max(time.time() - tick, 1e-9)
                run.log(f"stage {index + 1} epoch {epoch + 1} step {step + 1}/{steps}: loss {mean_loss:.4f}, "
                        f"lr {stage_lr:.3g}, {rate:.1f} img/s")
            window, tick = [], time.time()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{stage_lr:.2e}")
        if step + 1 < steps and any_rank(run.stop.requested, dist_info):
            progress.epoch_sums = dict(sums)
            save_checkpoint(run, optimizer, scaler)
            raise Interrupted(_interrupted_message(run))
    if bar is not None:
        bar.close()
    loss_mean = mean_over_ranks(sums["loss"], sums["count"], dist_info)
    accuracy = mean_over_ranks(float(sums["correct"]), sums["count"], dist_info)
    return loss_mean, accuracy


def _train_indices(run: Run, global_epoch: int) -> list[int]:
    """This rank's image order for an epoch: a function of (seed, epoch, rank, world size)."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(run.train_set, num_replicas=run.dist.world_size, rank=run.dist.rank,
                                 shuffle=True, seed=run.config.seed, drop_last=False)
    sampler.set_epoch(global_epoch)
    indices = list(sampler)
    if run.config.max_steps_per_epoch:
        indices = indices[: run.config.max_steps_per_epoch * run.config.batch_size]
    return indices


def _steps_per_epoch(run: Run) -> int:
    per_rank = math.ceil(len(run.train_set) / run.dist.world_size)
    steps = math.ceil(per_rank / run.config.batch_size)
    return min(steps, run.config.max_steps_per_epoch) if run.config.max_steps_per_epoch else steps


def _loader(dataset: torch.utils.data.Dataset, indices: list[int], batch_size: int, workers: int,
            seed: int) -> torch.utils.data.DataLoader:
    # the explicit generator keeps the loader from drawing on the global RNG (dropout's stream)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=indices, num_workers=workers, pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed), persistent_workers=False,
    )


def _wrap(run: Run, model: torch.nn.Module) -> torch.nn.Module:
    """A fresh DDP wrapper for this stage (it only sees the parameters that train now)."""
    if not run.dist.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    unused = _unused_parameters(run, model)
    if unused:
        run.log(f"{len(unused)} trainable parameters get no gradient (e.g. {unused[0]}); DDP will look for unused parameters")
    device_ids = [run.dist.local_rank] if run.dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=bool(unused))


def _unused_parameters(run: Run, model: torch.nn.Module) -> list[str]:
    """Trainable parameters that one forward/backward pass leaves without a gradient.

    The probe runs in eval mode, so it updates no normalisation statistics.
    """
    images = torch.stack([run.val_set[0][0]] * 2).to(run.dist.device)
    was_training = model.training
    model.eval()
    with _autocast(run.precision, run.dist.device):
        model(images).float().sum().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for p in model.parameters():
        p.grad = None
    model.train(was_training)
    return unused


def _autocast(precision: str, device: torch.device) -> Any:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


def _eval_batch(config: RunConfig) -> int:
    return config.eval_batch_size or 2 * config.batch_size


def _progress_bar(run: Run, steps: int, start: int, description: str) -> Any:
    """tqdm on rank 0 when stderr is a terminal; None means periodic log lines instead."""
    if not (run.dist.is_main and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=steps, initial=start, desc=description, leave=False, dynamic_ncols=True)


# -- evaluation -----------------------------------------------------------------------
def evaluate(model: torch.nn.Module, dataset: torch.utils.data.Dataset, classes: list[str], dist_info: DistInfo,
             batch_size: int, num_workers: int, precision: str) -> dict[str, Any]:
    """Metrics of ``model`` on ``dataset``; every rank takes part and gets the same numbers.

    Each rank predicts its share (``DistributedSampler`` without shuffling, which pads the
    last share by repeating images); the predictions are gathered, the repeats dropped,
    and the metrics computed once on exactly the evaluation set (SPEC §8).
    """
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=False)
    loader = _loader(WithIndex(dataset), list(sampler), batch_size, num_workers, 0)
    was_training = model.training
    model.eval()
    indices, labels, logits = [], [], []
    with torch.no_grad():
        for images, target, index in loader:
            with _autocast(precision, dist_info.device):
                out = model(images.to(dist_info.device, non_blocking=True))
            logits.append(out.float().cpu())
            labels.append(target)
            indices.append(index)
    model.train(was_training)
    k = len(classes)
    local = (torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long),
             torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
             torch.cat(logits) if logits else torch.zeros(0, k))
    _, all_labels, all_logits = gather_predictions(*local, dist_info, len(dataset))
    result = metrics_lib.compute_metrics(all_labels.numpy(), torch.softmax(all_logits, 1).numpy(), classes)
    result["loss"] = float(F.cross_entropy(all_logits, all_labels)) if len(all_labels) else 0.0
    return result


# -- saving ---------------------------------------------------------------------------
def _record(run: Run, index: int, epoch: int, split: str, values: Mapping[str, Any]) -> None:
    """One ``metrics.jsonl`` line and the TensorBoard scalars of an epoch's split (rank 0)."""
    if not run.dist.is_main:
        return
    line = {"stage": run.strategy.stages[index].name, "stage_index": index + 1, "epoch": epoch + 1, "split": split,
            "global_step": run.progress.global_step, **values}
    run.metric_lines.append(line)
    if split == "train":  # per-step train/loss and train/lr are logged while training
        scalars = {"accuracy": values["accuracy"], "epoch_loss": values["loss"]}
    else:
        scalars = {**metrics_lib.scalars(values), "loss": values["loss"]}
    for name, value in scalars.items():
        run.tb.scalar(_tag(run, index, f"{split}/{name}"), value, run.progress.global_step)


def save_best(run: Run, index: int) -> None:
    """This stage's best-validation weights, metrics and confusion matrix (files: rank 0)."""
    progress, stages = run.progress, run.strategy.stages
    if index + 1 < len(stages) and stages[index + 1].init == "best":
        # kept in memory on every rank: the next stage starts from it without reading files
        run.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}
    if not run.dist.is_main:
        return
    directory = stage_dir(run, index)
    classes = run.splits.classes
    save_model(run.rundir, f"{directory}/best.safetensors", run.model.state_dict(), {
        "cdft_spec": run.model.spec, "cdft_config": run.config.to_dict(), "cdft_classes": classes,
        "cdft_stage": stages[index].name, "cdft_stage_index": index + 1, "cdft_epoch": progress.best_epoch,
    })
    record = {"stage": stages[index].name, "epoch": progress.best_epoch, "val": progress.best_val, "test": progress.best_test}
    run.rundir.write_text(f"{directory}/best.json", json.dumps(record, indent=2))
    matrix = progress.best_test["confusion_matrix"]
    run.rundir.write_text(f"{directory}/confusion_matrix.csv", metrics_lib.confusion_csv(matrix, classes))
    run.tb.confusion_matrix(_tag(run, index, "test/confusion_matrix"), matrix, classes, progress.global_step)


def _previous_best(run: Run, index: int) -> dict[str, torch.Tensor]:
    """The previous stage's best-validation weights: from memory, or (after a resume) its file."""
    weights = run.best_weights
    if weights is None:
        name = f"{stage_dir(run, index - 1)}/best.safetensors"
        weights = read_model(run.rundir.join(name))[0] if run.dist.is_main else None
        weights = broadcast_object(weights, run.dist)
    run.log(f"stage {index + 1} starts from {stage_dir(run, index - 1)}/best.safetensors")
    return {k: v.to(run.dist.device) for k, v in weights.items()}


def save_checkpoint(run: Run, optimizer: torch.optim.Optimizer, scaler: Any) -> None:
    """A complete resumable state (every rank's RNG and running sums included), the metrics and the log (rank 0)."""
    progress = run.progress
    per_rank = all_gather_objects((capture_rng(), progress.epoch_sums), run.dist)
    if run.dist.is_main:
        rng = [rng_state for rng_state, _ in per_rank]
        record = asdict(progress)
        record["epoch_sums"] = [sums for _, sums in per_rank]  # one entry per rank
        record["scaler"] = scaler.state_dict() if scaler is not None else None
        record["elapsed"] = progress.elapsed + time.time() - run.started
        save_resume(run.rundir, tag=resume_tag(progress.stage_index, progress.epoch, progress.step),
                    model_state=run.model.state_dict(), optimizer_state=optimizer.state_dict(), rng_states=rng,
                    progress=record)
        _write_logs(run)
    barrier(run.dist)


def _write_logs(run: Run) -> None:
    run.rundir.write_text("metrics.jsonl", "".join(json.dumps(line) + "\n" for line in run.metric_lines))
    run.rundir.write_text("train.log", run.log.text())
    run.tb.flush()


def _stage_result(run: Run, index: int, epochs: int) -> dict[str, Any]:
    progress = run.progress
    stage = run.strategy.stages[index]
    return {
        "index": index + 1, "name": stage.name, "epochs": epochs, "lr": run.config.lr * stage.lr_factor,
        "init": stage.init, "best_epoch": progress.best_epoch, "val": progress.best_val, "test": progress.best_test,
        "checkpoint": f"{stage_dir(run, index)}/best.safetensors",
    }


def _interrupted_message(run: Run) -> str:
    p = run.progress
    where = (f"at stage {p.stage_index + 1}, epoch {p.epoch + 1}, step {p.step}" if p.step
             else f"after stage {p.stage_index + 1}, epoch {p.epoch}")
    return f"stopped by SIGTERM {where}; the state is saved: continue with `cdft run --resume {run.rundir.url}`"


def finish(run: Run) -> dict[str, Any] | None:
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
    run.tb.hparams({k: v for k, v in run.config.to_dict().items() if k not in ("output", "runs_dir")},
                   hparam_metrics, progress.global_step)
    run.log(f"done: test accuracy {final['test']['accuracy']:.4f} at stage {final['index']} epoch {final['best_epoch']}")
    _write_logs(run)
    run.rundir.write_text("summary.json", json.dumps(summary, indent=2))
    run.rundir.remove(RESUME_DIR)  # a complete run cannot be resumed: drop its optimizer state
    return summary


# -- cleanup and main -----------------------------------------------------------------
def cleanup(run: Run) -> None:
    run.stop.uninstall()
    run.tb.close()
    teardown()


def main(config: RunConfig, resume: str | None = None, argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run every stage; returns the summary on rank 0 (None on other ranks)."""
    run = setup(config, resume, argv)
    try:
        for index in range(run.progress.stage_index, len(run.strategy.stages)):
            train_stage(run, index)
        summary = finish(run)
        barrier(run.dist)
        return summary
    except BaseException as exc:
        if run.dist.is_main:  # keep the log and metrics of what happened
            with contextlib.suppress(Exception):  # never hide the real error behind a logging failure
                _write_logs(run)
        if isinstance(exc, KeyboardInterrupt):
            raise Interrupted(f"interrupted (Ctrl-C); continue from the last completed epoch with "
                              f"`cdft run --resume {run.rundir.url}`", exit_code=130) from None
        raise
    finally:
        cleanup(run)

