"""Where a run stands (:class:`Progress`), everything it holds (:class:`Run`), and the
saved state a resumed run starts from (:class:`SavedState`).

Resuming is settled here and in :func:`cdft_core.training.engine.setup`: the saved state
is read once, its model weights, progress, RNG streams and running sums are restored
before training starts, and its optimizer and grad-scaler state wait in
:attr:`Run.saved_optimizer` / :attr:`Run.saved_scaler` for the builders of the stage
that was interrupted. The stages themselves never ask whether they are resuming.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch

from cdft_core.config import RunConfig, dump_yaml
from cdft_core.errors import UsageError
from cdft_core.text import one_line
from cdft_core.training.checkpoint import damaged_resume, latest_resume
from cdft_core.training.distributed import DistInfo, broadcast_object
from cdft_core.training.faults import StepHook
from cdft_core.training.launch import record_run_dir
from cdft_core.training.loaders import RunLoaders
from cdft_core.training.log import RunLog
from cdft_core.training.rundir import (
    RunDir,
    auto_name,
    create_run_dir,
    environment_info,
    open_existing,
    run_plugins,
    write_run_split,
)
from cdft_core.training.signals import StopRequest

if TYPE_CHECKING:
    from cdft_core.data.splits import Splits
    from cdft_core.models.model import CdftModel
    from cdft_core.strategy import Strategy
    from cdft_core.training.ema import StageEma
    from cdft_core.training.frozen import FrozenFeatures
    from cdft_core.training.loaders import SeededAugmentation
    from cdft_core.training.tensorboard_log import TensorBoardLog


@dataclass
class Progress:
    """Where the run stands. Saved in every resume state; ``--resume`` restores it."""

    stage_index: int = 0  # the stage being trained (0-based); len(stages) once all are done
    epoch: int = 0  # completed epochs of that stage
    step: int = 0  # completed steps of the epoch in progress (only SIGTERM states have > 0)
    global_step: int = 0  # optimizer steps over the whole run (the TensorBoard x axis)
    best_accuracy: float | None = None  # best validation accuracy of this stage
    best_epoch: int | None = None
    best_val: dict | None = None  # validation metrics at the best epoch
    best_test: dict | None = None  # test metrics at the best epoch
    improved_epoch: int | None = None  # the stage's last epoch whose validation accuracy beat every earlier one
    epoch_sums: dict = field(default_factory=dict)  # this rank's running train loss/accuracy of the epoch in progress
    stages: list = field(default_factory=list)  # results of the finished stages
    elapsed: float = 0.0  # seconds of training before this process started

    def start_stage(self, index: int) -> None:
        self.stage_index, self.epoch, self.step = index, 0, 0
        self.best_accuracy = self.best_epoch = self.best_val = self.best_test = self.improved_epoch = None
        self.epoch_sums = {}

    def note_validation(self, val: dict, epoch: int) -> bool:
        """Record epoch ``epoch``'s (0-based) validation metrics; True when they are the best
        so far. The best rule is ``>=`` (a tie moves the best to the later epoch); for
        ``--patience`` only a strictly higher accuracy counts as an improvement, so a
        plateau of equal accuracies ends the stage."""
        accuracy = val["accuracy"]
        if self.best_accuracy is None or accuracy > self.best_accuracy:
            self.improved_epoch = epoch + 1
        is_best = self.best_accuracy is None or accuracy >= self.best_accuracy
        if is_best:
            self.best_accuracy, self.best_epoch, self.best_val = accuracy, epoch + 1, val
        return is_best

    def stage_done(self, epochs: int, patience: int | None) -> bool:
        """Whether the stage has trained all it will: its ``epochs``, or ``patience`` epochs
        without an improvement (:meth:`note_validation`)."""
        waited = self.epoch - (self.improved_epoch or 0)
        return self.epoch >= epochs or (patience is not None and self.epoch > 0 and waited >= patience)

    def record(self, rank_sums: list[dict], scaler: dict | None, elapsed: float) -> dict[str, Any]:
        """The JSON record a resume state stores: this progress, every rank's running sums, the scaler."""
        record = asdict(self)
        record.update(epoch_sums=rank_sums, scaler=scaler, elapsed=elapsed)
        return record


@dataclass
class SavedState:
    """A resume state as the run's builders consume it (see the module docstring)."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: list[tuple[dict[str, torch.Tensor], dict[str, Any]]]  # one entry per rank
    epoch_sums: list[dict]  # one entry per rank
    progress: Progress
    ema: dict[str, torch.Tensor] | None = None  # the interrupted stage's --ema average
    source: str = "RUN/resume"  # the record it was read from, for errors

    def load_weights(self, model: torch.nn.Module, device: torch.device) -> None:
        """The saved weights into ``model``; weights of another model (an edited or mixed-up
        state) are a damaged state, in one line, not torch's list of every mismatched key."""
        try:
            model.load_state_dict({k: v.to(device) for k, v in self.model.items()})
        except RuntimeError as exc:
            raise damaged_resume(self.source, f"its weights do not fit this run's model: "
                                              f"{one_line(str(exc), 160)}") from None

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> SavedState:
        record = state["progress"]
        problem = _progress_problem(record, len(state["rng"]))
        if problem:
            raise damaged_resume(state.get("source", "RUN/resume"), problem)
        known = {f.name for f in fields(Progress)} - {"epoch_sums"}  # per rank: restored in setup
        return cls(
            model=state["model"], optimizer=state["optimizer"], scaler=record.get("scaler"), rng=state["rng"],
            epoch_sums=list(record.get("epoch_sums") or []),
            progress=Progress(**{k: v for k, v in record.items() if k in known}), ema=state.get("ema"),
            source=state.get("source", "RUN/resume"),
        )


#: the JSON types of the progress fields a resume record holds (``None`` where a field may be unset)
_PROGRESS_TYPES: dict[str, tuple[type | None, ...]] = {
    "stage_index": (int,), "epoch": (int,), "step": (int,), "global_step": (int,),
    "best_accuracy": (float, int, None), "best_epoch": (int, None), "best_val": (dict, None),
    "best_test": (dict, None), "improved_epoch": (int, None), "stages": (list,), "elapsed": (float, int),
    "scaler": (dict, None), "epoch_sums": (list, None),
}


def _progress_problem(record: Any, ranks: int) -> str | None:
    """What makes a saved progress record unusable, or None: a wrong type here would
    otherwise surface as a raw ``AttributeError`` or ``TypeError`` in the middle of training."""
    if not isinstance(record, Mapping):
        return "progress is not a JSON object"
    for key, kinds in _PROGRESS_TYPES.items():
        if key not in record:
            continue  # an older record without it: the field keeps its default
        value = record[key]
        if isinstance(value, bool) or not any(value is None if k is None else isinstance(value, k) for k in kinds):
            return f"progress.{key} has the wrong type ({one_line(repr(value), 60)})"
        if isinstance(value, int) and kinds == (int,) and value < 0:
            return f"progress.{key} is negative"
    sums = record.get("epoch_sums") or []
    if not all(isinstance(entry, Mapping) for entry in sums) or (sums and len(sums) != ranks):
        return "progress.epoch_sums does not hold one JSON object per process"
    return None


@dataclass
class RunData:
    """The three datasets of a run, transforms applied (train: seeded augmentation)."""

    train: SeededAugmentation
    val: torch.utils.data.Dataset
    test: torch.utils.data.Dataset


@dataclass
class Run:
    """Everything :func:`~cdft_core.training.engine.setup` builds and the stages use."""

    config: RunConfig
    dist: DistInfo
    rundir: RunDir
    splits: Splits
    model: CdftModel
    strategy: Strategy
    adapter: str
    data: RunData
    precision: str
    tb: TensorBoardLog
    log: RunLog
    stop: StopRequest
    progress: Progress
    metric_lines: list[dict]
    started: float = field(default_factory=time.time)
    after_step: StepHook | None = None  # test-only fault injection (cdft_core.training.faults)
    saved_optimizer: dict | None = None  # the interrupted stage's optimizer state, for its builder
    saved_scaler: dict | None = None
    saved_ema: dict | None = None  # the interrupted stage's moving average (--ema)
    best_weights: dict | None = None  # the stage's best-validation weights (for its test evaluation)
    loaders: RunLoaders = field(default_factory=RunLoaders)  # reused every epoch: their workers persist
    features: FrozenFeatures | None = None  # a frozen stage's stored backbone outputs (cdft_core.training.frozen)

    def take_saved(self) -> tuple[dict | None, dict | None, dict | None]:
        """The saved optimizer, scaler and moving-average state, once: the stage resumed in gets
        them, later stages None."""
        saved = self.saved_optimizer, self.saved_scaler, self.saved_ema
        self.saved_optimizer = self.saved_scaler = self.saved_ema = None
        return saved


def open_run_dir(config: RunConfig, resume: str | None, dist_info: DistInfo, log: RunLog,
                 argv: list[str], spec: Mapping[str, Any],
                 splits: Splits | None = None) -> tuple[RunDir, SavedState | None, list[dict]]:
    """Rank 0 creates the run directory, or reopens it to resume; every rank gets the saved state.

    A new run also gets ``split.csv``, the rows of ``splits`` it trains on
    (:func:`~cdft_core.training.rundir.write_run_split`); a resumed run keeps the one
    written at its creation.

    Returns the directory, the saved state (None for a new run or one killed before its
    first save) and the ``metrics.jsonl`` lines that state covers.
    """
    if not resume:
        url = None
        if dist_info.is_main:
            name = auto_name(config.dataset, config.backbone, config.strategy, config.val_fold, config.test_fold, config.seed)
            rundir = create_run_dir(config.output, config.runs_dir, name)
            rundir.write_text("config.yaml", dump_yaml(config))
            if splits is not None:
                write_run_split(rundir, splits)
            rundir.write_text("environment.json", json.dumps(
                environment_info(list(argv), dist_info.world_size, run_plugins(config, spec)), indent=2))
            url = rundir.url
            record_run_dir(url)  # for the launcher's resume command, should the job fail
        return RunDir(broadcast_object(url, dist_info)), None, []

    rundir = open_existing(resume)
    if dist_info.is_main:
        record_run_dir(rundir.url)
    if rundir.exists("summary.json"):
        raise UsageError(f"run {resume!r} is complete (it has summary.json); nothing to resume")
    state = broadcast_object(latest_resume(rundir) if dist_info.is_main else None, dist_info)
    if dist_info.is_main:
        if rundir.exists("train.log"):
            log.previous = rundir.read_text("train.log")
        rundir.write_text("config.yaml", dump_yaml(config))  # the same run, perhaps with its data elsewhere now
    if state is None:
        log(f"resuming {rundir.url}: no saved state yet, starting from the beginning")
        return rundir, None, []
    saved = SavedState.from_checkpoint(state)
    progress = saved.progress
    log(f"resuming {rundir.url} after stage {progress.stage_index + 1}, epoch {progress.epoch}"
        + (f" and {progress.step} steps of epoch {progress.epoch + 1}" if progress.step else ""))
    if progress.step and len(saved.rng) != dist_info.world_size:
        raise UsageError(
            f"this state was saved in the middle of an epoch by {len(saved.rng)} processes; "
            f"resume it with the same number of processes"
        )
    lines = metric_lines_until(rundir, progress) if dist_info.is_main else []
    return rundir, saved, lines


def metric_lines_until(rundir: RunDir, progress: Progress) -> list[dict]:
    """The metric lines of the epochs a resume state covers (a killed run may have written more)."""
    if not rundir.exists("metrics.jsonl"):
        return []
    lines = [json.loads(line) for line in rundir.read_text("metrics.jsonl").splitlines() if line.strip()]
    done = (progress.stage_index + 1, progress.epoch)
    # the stage in progress has no test line yet: one there is from a completion that was cut short
    return [line for line in lines if (line["stage_index"], line["epoch"]) <= done
            and not (line["split"] == "test" and line["stage_index"] == progress.stage_index + 1)]


@dataclass
class StageRun:
    """One stage in training: what each epoch of it needs besides the run."""

    index: int  # 0-based
    epochs: int
    steps: int  # optimizer steps per epoch
    warmup: int  # warm-up steps
    model: torch.nn.Module  # what trains: the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    ema: StageEma | None = None  # --ema: the average of the trainable weights
    class_weights: torch.Tensor | None = None  # --class-weights balanced: the training loss's weights

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps
