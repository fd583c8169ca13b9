"""The run configuration: every knob of ``cdft run``, its default, and its validation.

One flat dataclass is the single source of truth. A key is the CLI option's name with
dashes turned into underscores (``--val-fold`` <-> ``val_fold``), so a YAML preset, the
command line and the ``config.yaml`` saved with a run all speak the same language.
Precedence: defaults < ``--config FILE.yaml`` < explicit CLI options.

The defaults are the paper's recipe (docs/method.md#recipe): Adam, weight decay 1e-3, learning rate
1e-4, batch 8 per process, 100 epochs, 2 warm-up epochs from 0.01·lr then cosine per
step, seed 1, image size from the backbone.

This module stays free of torch so the CLI can validate before any heavy import.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from cdft_core.errors import UsageError
from cdft_core.text import one_line, parse_bool
from cdft_core.yaml_files import dump_mapping, load_yaml, yaml_value

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS = ("adam", "adamw")
#: ``--augment``: the paper's augmentation, the same plus HED stain jitter, or resize only (cdft_core/data/transforms.py)
AUGMENTS = ("paper", "paper+hed", "none")
CLASS_WEIGHTS = ("none", "balanced")
SAMPLERS = ("random", "balanced")
#: ``--compile-mode``: torch.compile's modes (``torch._inductor.list_mode_options()``); the
#: CUDA-graph ones (reduce-overhead, max-autotune) take effect on CUDA only
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: The largest --seed: numpy's RandomState and scikit-learn's random_state (the in-memory
#: folds) take at most 2**32 - 1, the narrowest of the seed consumers (torch takes 64 bits).
MAX_SEED = 2**32 - 1


@dataclass
class RunConfig:
    """Everything that determines a run; each field's ``help`` is its ``cdft run --help`` text."""

    # -- data --------------------------------------------------------------------------
    dataset: str | None = field(default=None, metadata={"help": "dataset name (`cdft list datasets`)"})
    data_root: str | None = field(default=None, metadata={"help": "directory or fsspec URL holding the images"})
    split_file: str | None = field(default=None, metadata={"help": "CSV image_path,label,fold from `cdft prepare`; none: split in memory"})
    val_fold: int = field(default=0, metadata={"help": "fold used for validation (model selection)"})
    test_fold: int = field(default=1, metadata={"help": "fold used for testing (its meaning depends on the protocol)"})
    folds: int | None = field(default=None, metadata={"help": "number of folds when splitting in memory (dataset default if unset)"})
    protocol: str | None = field(default=None, metadata={"help": "dataset protocol (dataset default if unset)"})
    dataset_options: dict[str, str] = field(default_factory=dict, metadata={"help": "dataset-specific KEY=VALUE"})
    augment: str = field(default="paper", metadata={"help": "training augmentation: paper (the paper's flips, brightness/contrast, affine), paper+hed (the same plus HED stain jitter; needs pip install 'cdft[stain]') or none (resize only, as evaluation)"})
    # -- model -------------------------------------------------------------------------
    backbone: str | None = field(default=None, metadata={"help": "backbone name (`cdft list backbones`)"})
    adapter: str | None = field(default=None, metadata={"help": "adapter name; unset: the strategy's default"})
    adapter_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "adapter KEY=VALUE"})
    weights: str | None = field(default=None, metadata={"help": "local weight file for the backbone (offline machines)"})
    pretrained: bool = field(default=True, metadata={"help": "load pretrained backbone weights (false: random init)"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory in the backbone"})
    image_size: int | None = field(default=None, metadata={"help": "input size; unset: the backbone's pretrained size"})
    # -- strategy ----------------------------------------------------------------------
    strategy: str = field(default="staged", metadata={"help": "fine-tuning strategy (`cdft list strategies`)"})
    strategy_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "strategy KEY=VALUE (stage_epochs, lr_factor...)"})
    # -- optimisation ------------------------------------------------------------------
    optimizer: str = field(default="adam", metadata={"help": "adam (paper) or adamw"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (per stage, times the stage's lr factor)"})
    weight_decay: float = field(default=1e-3, metadata={"help": "weight decay of the optimizer"})
    batch_size: int = field(default=8, metadata={"help": "training batch size per process"})
    eval_batch_size: int | None = field(default=None, metadata={"help": "evaluation batch size per process (default 2x batch size)"})
    epochs: int = field(default=100, metadata={"help": "epochs per stage unless the strategy says otherwise"})
    warmup_epochs: float = field(default=2.0, metadata={"help": "linear warm-up length, restarted at each stage"})
    warmup_start_factor: float = field(default=0.01, metadata={"help": "warm-up starts at this fraction of the learning rate"})
    max_steps_per_epoch: int | None = field(default=None, metadata={"help": "cap on training steps per epoch (quick experiments)"})
    class_weights: str = field(default="none", metadata={"help": "none, or balanced: training loss weights N/(K*n_class) from the training split's class counts"})
    sampler: str = field(default="random", metadata={"help": "random (a seeded shuffle), or balanced: each epoch draws the training images with replacement, every class equally likely"})
    accumulate: int = field(default=1, metadata={"help": "micro-batches of --batch-size per optimizer step (effective batch: batch size x accumulate x processes)"})
    patience: int | None = field(default=None, metadata={"help": "end a stage after N epochs without a higher validation accuracy; unset: train every epoch"})
    ema: float | None = field(default=None, metadata={"help": "decay in (0, 1) of an exponential moving average of the trainable weights, validated, selected and saved; unset: off"})
    seed: int = field(default=1, metadata={"help": "fixes the split, the initialisation, the data order and augmentation"})
    # -- hardware ----------------------------------------------------------------------
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16 (with a grad scaler)"})
    num_workers: int | str = field(default="auto", metadata={"help": "data-loading worker processes per training process; auto: the CPUs this process may use, at most 8 (0 with one CPU)"})
    dist_timeout: float = field(default=1800.0, metadata={"help": "seconds a collective may wait before the job fails"})
    sync_batchnorm: bool = field(default=False, metadata={"help": "BatchNorm statistics over all processes' batches (CUDA, several processes)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (first steps compile; same results within float tolerance)"})
    compile_mode: str = field(default="default", metadata={"help": "with --compile: default, reduce-overhead (CUDA graphs), max-autotune (autotuned kernels and CUDA graphs; minutes of compiling) or max-autotune-no-cudagraphs"})
    cache: bool = field(default=True, metadata={"help": "decode and resize each image once into a memory-mapped cache that later epochs, runs and processes reuse (same results)"})
    cache_dir: str | None = field(default=None, metadata={"help": "local directory of the image cache; unset: $CDFT_CACHE_DIR, else the user cache dir (~/.cache/cdft)"})
    feature_cache: bool = field(default=True, metadata={"help": "while a stage's backbone is frozen, compute its validation and test features once and reuse them every epoch (same results)"})
    train_views: int | None = field(default=None, metadata={"help": "frozen stages: compute N augmented views of each training image once and train epoch e on view e mod N (an approximation); unset: augment afresh every epoch"})
    # -- output ------------------------------------------------------------------------
    output: str | None = field(default=None, metadata={"help": "the run directory (local path or fsspec URL); must not hold results"})
    runs_dir: str = field(default="runs", metadata={"help": "parent of automatically named run directories"})
    log_every: int = field(default=20, metadata={"help": "training steps between log lines and train/loss points"})
    tensorboard: bool = field(default=True, metadata={"help": "write TensorBoard event files in the run directory"})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> RunConfig:
        return merge(RunConfig(), data, source=source)


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(RunConfig))
_DICT_FIELDS = {"dataset_options", "adapter_options", "strategy_options"}


def _field_type(name: str) -> str:
    return str(next(f.type for f in fields(RunConfig) if f.name == name))


def merge(base: RunConfig, overrides: Mapping[str, Any], *, source: str) -> RunConfig:
    """``base`` with ``overrides`` applied; unknown keys and wrong types are usage errors.

    Option dictionaries (``dataset_options`` ...) are merged key by key so a CLI
    ``--adapter-option`` adds to a preset's options instead of replacing them.
    """
    values = base.to_dict()
    for key, value in overrides.items():
        name = str(key).replace("-", "_")
        if name not in FIELD_NAMES:
            close = difflib.get_close_matches(name, FIELD_NAMES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; see `cdft run --help`"
            raise UsageError(f"{source}: unknown configuration key {_shown(key)}{hint}")
        values[name] = _coerce(name, value, source)
        if name in _DICT_FIELDS:
            merged = dict(getattr(base, name))
            merged.update(values[name])
            values[name] = merged
    return RunConfig(**values)


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check and convert one value to its field's type (YAML gives ints for floats etc.)."""
    kind = _field_type(name)
    if name == "num_workers":
        return check_num_workers(value, what=f"{source}: num_workers")
    if value is None:
        if "None" in kind:
            return None
        raise UsageError(f"{source}: {name} must not be empty")
    if name in _DICT_FIELDS:
        if not isinstance(value, Mapping):
            raise UsageError(f"{source}: {name} must be a mapping of KEY: VALUE, got {_shown(value)}")
        for key, item in value.items():
            if _non_finite(item):
                raise UsageError(f"{source}: {name} {key}={_shown(item)} is not a finite number")
        if name == "dataset_options":
            return {str(k): str(v) for k, v in value.items()}
        return {str(k): v for k, v in value.items()}
    if kind.startswith("bool"):
        if not isinstance(value, (bool, str)) or (isinstance(value, str) and not value.strip()):
            raise UsageError(f"{source}: {name} must be true or false, got {_shown(value)}")
        return parse_bool(value, what=f"{source}: {name}")
    if kind.startswith("int"):
        if isinstance(value, bool) or not _is_int(value):
            raise UsageError(f"{source}: {name} must be an integer, got {_shown(value)}")
        return int(value)
    if kind.startswith("float"):
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"{source}: {name} must be a number, got {_shown(value)}") from None
        if not math.isfinite(number):
            raise UsageError(f"{source}: {name} must be a finite number, got {_shown(value)}")
        return number
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise UsageError(f"{source}: {name} must be a string, got {_shown(value)}")
    return str(value)


def check_num_workers(value: Any, *, what: str = "--num-workers") -> int | str:
    """``auto`` or a count of loader workers (>= 0); anything else is a usage error.

    ``auto`` is kept as asked (``config.yaml`` records it) and resolved where the loaders
    are built (:func:`cdft_core.training.loaders.resolve_num_workers`).
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, bool) or not _is_int(value) or int(value) < 0:
        raise UsageError(f"{what} must be auto or a number of worker processes (0, 1, 2...), got {_shown(value)}")
    return int(value)


#: what a near-miss of a choice most likely meant, where spelling alone would not find it
_MEANT = {"gpu": "cuda", "hed": "paper+hed", "stain": "paper+hed", "off": "none"}


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """A one-line :class:`UsageError` for a ``--name`` value outside ``choices``, with "did you mean"."""
    if value in choices:
        return
    meant = _MEANT.get(str(value).lower())
    close = [meant] if meant in choices else difflib.get_close_matches(str(value).lower(), choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UsageError(f"{_flag(name)} {_shown(value)} is not one of {', '.join(choices)}{hint}")


def _shown(value: Any) -> str:
    """A value for an error line: its repr, cut short (a YAML file may hold a megabyte of it)."""
    return one_line(repr(value), 80)


def _non_finite(value: Any) -> bool:
    """``inf``, ``-inf``, ``nan`` (as floats or as the strings that float() reads as them)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return False
    try:
        return not math.isfinite(float(value))
    except ValueError:
        return False


def _is_int(value: Any) -> bool:
    if isinstance(value, int):
        return True
    if isinstance(value, float):
        return value.is_integer()
    if isinstance(value, str):
        try:
            int(value)
        except ValueError:
            return False
        return True
    return False


#: What a resumed run may change: where the same data now live and how they are loaded;
#: nothing that changes what is computed.
RESUME_OVERRIDES: tuple[str, ...] = ("data_root", "split_file", "num_workers", "dist_timeout", "log_every", "cache",
                                     "cache_dir", "feature_cache")


def resolve_config(overrides: Mapping[str, Any], *, preset: str | None = None, resume: str | None = None) -> RunConfig:
    """The configuration a run uses, validated.

    A new run: defaults < the ``preset`` YAML (``--config FILE``) < ``overrides`` (the
    command line). A resumed run: its saved ``config.yaml`` < those ``overrides`` that
    :data:`RESUME_OVERRIDES` allows; a preset or any other override is a usage error.
    """
    if resume:
        from cdft_core.training.rundir import open_existing

        changes = [k for k in overrides if k not in RESUME_OVERRIDES]
        if preset or changes:
            given = (["--config"] if preset else []) + [_flag(k) for k in changes]
            raise UsageError(
                f"--resume continues a run with its saved configuration; drop {', '.join(given)} "
                f"(only {', '.join(_flag(k) for k in RESUME_OVERRIDES)} may change)"
            )
        rundir = open_existing(resume)
        if rundir.exists("summary.json"):  # refused here, before any model or data is touched
            raise UsageError(f"run {resume!r} is complete (it has summary.json); nothing to resume")
        saved = rundir.join("config.yaml")
        config = merge(RunConfig(), load_yaml(saved), source=saved)
    else:
        config = merge(RunConfig(), load_yaml(preset) if preset else {}, source=preset or "config")
    config = merge(config, overrides, source="command line")
    validate(config)
    return config


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def dump_yaml(config: RunConfig) -> str:
    """The resolved configuration as YAML, keys in declaration order, without anchors."""
    return dump_mapping(config.to_dict())


def parse_key_values(items: Iterable[str], *, option: str, typed: bool = True) -> dict[str, Any]:
    """``KEY=VALUE`` strings to a dict; values are YAML scalars when ``typed`` (``0.1`` -> float)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"{option} expects KEY=VALUE, got {item!r}")
        if typed:
            value = yaml_value(raw, f"{option} {key}")
            if isinstance(value, (dict, list)) and not raw.strip().startswith(("{", "[")):
                value = raw
        else:
            value = raw
        out[key] = value
    return out


def validate(config: RunConfig, *, values_only: bool = False) -> None:
    """Checks that need nothing but the config itself (names are resolved later, in the registry).

    Raises :class:`UsageError` with one line naming the option and the fix. ``values_only``
    skips required names and paths: a grid listed on a login node (or the demo before it
    writes its images) judges values while the data are elsewhere; the run checks the rest.
    """
    if values_only:
        return _check_values(config)
    _check_required(config)
    _check_values(config)
    _check_exists(config.data_root, "--data-root", "the directory holding the images", directory=True)
    if config.split_file:
        _check_exists(config.split_file, "--split-file", "a CSV written by `cdft prepare`", directory=False)
    if config.weights:
        _check_exists(config.weights, "--weights", "a .safetensors/.pth/.bin weight file", directory=False)


def _check_required(config: RunConfig) -> None:
    if not config.dataset:
        raise UsageError("no dataset given; pass --dataset NAME (see `cdft list datasets`)")
    if not config.data_root:
        raise UsageError("no data root given; pass --data-root DIR (the directory holding the images)")
    if not config.backbone:
        raise UsageError("no backbone given; pass --backbone NAME (see `cdft list backbones`)")
    if not config.strategy:
        raise UsageError("no strategy given; pass --strategy NAME (see `cdft list strategies`)")


def _check_values(config: RunConfig) -> None:
    positive = {
        "batch_size": "--batch-size",
        "epochs": "--epochs",
        "log_every": "--log-every",
        "accumulate": "--accumulate",
    }
    for name, option in positive.items():
        if getattr(config, name) < 1:
            raise UsageError(f"{option} must be at least 1, got {getattr(config, name)}")
    for name, option in (("eval_batch_size", "--eval-batch-size"), ("max_steps_per_epoch", "--max-steps-per-epoch"),
                         ("image_size", "--image-size"), ("folds", "--folds"), ("train_views", "--train-views"),
                         ("patience", "--patience")):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise UsageError(f"{option} must be at least 1, got {value}")
    if config.folds is not None and config.folds < 2:
        raise UsageError(f"--folds must be at least 2, got {config.folds}")
    if config.val_fold < 0 or config.test_fold < 0:
        raise UsageError("--val-fold and --test-fold must be fold numbers (0, 1, ...)")
    if config.val_fold == config.test_fold:
        raise UsageError(f"--val-fold and --test-fold are both {config.val_fold}; validation and test folds must differ")
    if config.folds is not None and config.split_file:
        raise UsageError(f"--folds {config.folds} only applies when splitting in memory; the split file has its own folds: "
                         "drop --folds (or drop --split-file)")
    if config.folds is not None and max(config.val_fold, config.test_fold) >= config.folds:
        raise UsageError(f"--val-fold/--test-fold must be below --folds {config.folds}")
    if not config.lr > 0:
        raise UsageError(f"--lr must be positive, got {config.lr}")
    if config.weight_decay < 0:
        raise UsageError(f"--weight-decay must not be negative, got {config.weight_decay}")
    if config.warmup_epochs < 0:
        raise UsageError(f"--warmup-epochs must not be negative, got {config.warmup_epochs}")
    if not 0 < config.warmup_start_factor <= 1:
        raise UsageError(f"--warmup-start-factor must be in (0, 1], got {config.warmup_start_factor}")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or not 0 <= config.seed <= MAX_SEED:
        raise UsageError(f"--seed must be an integer in [0, {MAX_SEED}], got {config.seed!r}")
    check_num_workers(config.num_workers)
    check_choice("augment", config.augment, AUGMENTS)
    if not config.dist_timeout > 0:
        raise UsageError(f"--dist-timeout must be positive seconds, got {config.dist_timeout}")
    for name, choices in (("device", DEVICES), ("precision", PRECISIONS), ("optimizer", OPTIMIZERS),
                          ("class_weights", CLASS_WEIGHTS), ("sampler", SAMPLERS), ("compile_mode", COMPILE_MODES)):
        check_choice(name, getattr(config, name), choices)
    if config.compile_mode != "default" and not config.compile:
        raise UsageError(f"--compile-mode {config.compile_mode} only applies to a compiled model; add --compile "
                         f"(or drop --compile-mode)")
    if config.ema is not None and not 0 < config.ema < 1:
        raise UsageError(f"--ema is the average's decay, in (0, 1) (e.g. 0.999), got {config.ema}")
    if config.train_views is not None and not config.feature_cache:
        raise UsageError(f"--train-views {config.train_views} stores training views in the feature cache; "
                         f"drop --no-feature-cache (or --train-views)")
    if config.pretrained is False and config.weights:
        raise UsageError("--no-pretrained and --weights contradict each other; drop one")
    if config.cache_dir and ("://" in config.cache_dir or "::" in config.cache_dir):
        raise UsageError(f"--cache-dir {config.cache_dir!r} must be a local directory (the image cache is memory-mapped "
                         f"and locked); drop it or pass a local path")


def _check_exists(path: str, option: str, what: str, *, directory: bool) -> None:
    from cdft_core.data.root import open_url

    shown = one_line(path, 120)
    fs, inner = open_url(path, option)  # archive URLs: missing, not an archive, empty
    try:
        ok = fs.isdir(inner) if directory else fs.isfile(inner)
        exists = ok or fs.exists(inner)
    except (ValueError, OSError) as exc:
        raise UsageError(f"{option} {shown!r} cannot be opened: {one_line(exc, 200)}") from None
    if not ok:
        kind = "directory" if directory else "file"
        problem = f"is not a {kind}" if exists else "does not exist"
        raise UsageError(f"{option} {shown!r} {problem}; pass {what}")


def absolute_paths(config: RunConfig) -> RunConfig:
    """``config`` with relative local data, split, weight and output paths made absolute.

    The run saves its configuration; ``cdft run --resume`` and ``cdft eval`` read it back,
    maybe from another working directory, where a relative path would point nowhere.
    URLs (``s3://...``, ``zip://...::...``) are left as they are.
    """
    changes = {}
    for name in ("data_root", "split_file", "weights", "output", "runs_dir", "cache_dir"):
        value = getattr(config, name)
        if value and "://" not in value and "::" not in value and not os.path.isabs(value):
            changes[name] = os.path.abspath(value)
    return dataclasses.replace(config, **changes)


def resolve_device(requested: str) -> str:
    """``auto`` -> cuda when available; ``cpu``, ``cuda`` and ``cuda:N`` as asked.

    Anything else, or a CUDA device this machine does not have, is a usage error here:
    torch's own errors ("Expected one of cpu, cuda, ipu, xpu...", "Found no NVIDIA
    driver") name neither the option nor the fix.
    """
    import re

    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return requested
    index = re.fullmatch(r"cuda(?::(\d+))?", requested)
    if index is None:
        raise UsageError(f"--device {requested!r} is not one of auto, cpu, cuda, cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UsageError(f"--device {requested} was asked for but no CUDA device is available; use --device cpu")
    if index[1] is not None and int(index[1]) >= count:
        raise UsageError(f"--device {requested}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return requested


def resolve_precision(requested: str, device: str) -> str:
    """bf16 by default on CUDA, fp32 on CPU; fp16 (grad scaler) needs CUDA."""
    if requested == "auto":
        return "bf16" if device == "cuda" else "fp32"
    if requested == "fp16" and device != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device (its grad scaler); use fp32 or bf16 on CPU")
    return requested
