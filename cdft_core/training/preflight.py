"""Checks before any work: every name and option resolved, the image size checked against
the backbone and the memory, the run's splits loaded.

Cheap (no model weights, no data): the CLI calls them before launching processes, so that
a typo costs a second, not a cluster allocation; :func:`~cdft_core.training.engine.setup`
calls them again in every process.

**Image size.** The backbone is built on PyTorch's ``meta`` device (shapes only, no memory,
no weights) at the requested size, and one image goes through it. That gives its
patch size or total stride (an image smaller than one patch is refused, naming the
smallest size that works), its token count and width, and its parameter count (a ViT's
position embedding grows with the image).

**Memory** (:func:`needed_bytes`, a deliberate floor): the parameters (16 bytes each while
a stage trains the backbone: fp32 weights, gradients, Adam's two moments; else 4), plus,
per image of a training batch, the output of every block of the backbone (each module
with parameters inside an ``nn.Sequential``/``nn.ModuleList``: a ViT's blocks, a ConvNeXt's
stages, blocks and stem), which its backward pass must keep; 4 bytes a value in fp32, 2 in
bf16/fp16 — also when only parameters a strategy added train (LoRA: its backward runs
through every block, while the frozen base weights take 4 bytes each). A stage with a
frozen backbone keeps none: then, and for evaluation (no
gradients, the evaluation batch), two block outputs at a time. Real training keeps
several times more (attention, MLP and normalisation inputs), so the check never refuses
a run that could fit (ViT-B/16 or ConvNeXt-B at 224 px, batch 32, fp32: under 3 GiB); it
refuses sizes that cannot, before the model is built, instead of failing in an allocation
minutes later. It is compared with the memory available to this process: ``MemAvailable``
(and the cgroup's limit) shared by the processes of this node on the CPU; the free memory
of the process's GPU on CUDA.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cdft_core.config import RunConfig, resolve_precision
from cdft_core.errors import UsageError
from cdft_core.text import one_line

if TYPE_CHECKING:
    from cdft_core.data.splits import Splits
    from cdft_core.strategy import Strategy


def preflight(config: RunConfig) -> tuple[Strategy, str]:
    """Resolve every name and option through the registry; returns (strategy, adapter name)."""
    from cdft_core.data.options import build_dataset
    from cdft_core.data.transforms import check_augment
    from cdft_core.registry import get_registry
    from cdft_core.strategy import build_strategy, check_adapter

    registry = get_registry()
    build_dataset(config.dataset, config.dataset_options, registry)
    check_augment(config.augment)  # paper+hed without scikit-image: the extra to install, before any work
    registry.get("backbone", config.backbone)
    strategy = build_strategy(config.strategy, config.strategy_options, registry=registry)
    adapter = config.adapter or strategy.default_adapter
    registry.get("adapter", adapter)
    check_adapter(strategy, adapter, registry=registry)
    cost = input_cost(config.backbone, config.image_size)
    if cost is not None and _device_of(config) == "cpu":  # a GPU's memory is checked by each process in setup
        check_memory(config, strategy, "cpu", cost=cost)
    return strategy, adapter


def load_run_splits(config: RunConfig) -> Splits:
    """The run's train/val/test tables (folds checked, none empty); reads the split file or scans the root."""
    from cdft_core.data.splits import load_splits

    splits = load_splits(
        config.dataset, config.data_root, split_file=config.split_file, val_fold=config.val_fold,
        test_fold=config.test_fold, protocol=config.protocol, options=config.dataset_options,
        folds=config.folds, seed=config.seed,
    )
    for name in ("train", "val", "test"):
        if len(getattr(splits, name)) == 0:
            raise UsageError(f"the {name} split is empty (val fold {config.val_fold}, test fold {config.test_fold}); check the folds")
    return splits


# -- image size and memory ------------------------------------------------------------
#: bytes a parameter holds while a stage trains it (fp32 weights, gradients, Adam's two moments), and frozen
TRAINED_PARAM_BYTES, FROZEN_PARAM_BYTES = 16, 4


@dataclass(frozen=True)
class InputCost:
    """What images of ``image_size`` px cost in a backbone (one image; from a meta-device pass)."""

    backbone: str
    image_size: int
    default_size: bool  # the backbone's own size (no --image-size)
    stride: int | None  # a ViT's patch size, a CNN's total stride (None: unknown)
    tokens: int  # tokens per image at the end of the backbone
    width: int  # their channels
    parameters: dict[str, Any]  # ``backbone.<name>`` -> meta tensor (the strategies' label functions see these)
    block_values: int  # the outputs of all blocks, summed
    largest_block: int  # the largest block output

    @property
    def parameter_count(self) -> int:
        return sum(int(p.numel()) for p in self.parameters.values())


#: (canonical backbone name, image size) -> its cost, for the registry in ``_COSTS_OF`` (a
#: rebuilt registry may put another plugin behind a name: its costs are measured afresh)
_COSTS: dict[tuple[str, int | None], InputCost | None] = {}
_COSTS_OF: list[Any] = [None]


def input_cost(backbone: str, image_size: int | None) -> InputCost | None:
    """The cost of ``image_size`` px images in ``backbone`` (cached); None when the backbone
    cannot be built on the meta device (a plugin's): the real build then does the checking.

    An image size the backbone cannot take (smaller than one patch, not a multiple of the
    patch where one is required) is a :class:`UsageError` naming ``--image-size`` and a
    size that works.
    """
    from cdft_core.registry import get_registry

    registry = get_registry()
    if _COSTS_OF[0] is not registry:
        _COSTS.clear()
        _COSTS_OF[0] = registry
    key = (registry.get("backbone", backbone).name, image_size)
    if key not in _COSTS:
        _COSTS[key] = _measure(backbone, image_size)
    return _COSTS[key]


def _build_meta(backbone: str, image_size: int | None) -> Any:
    import torch

    from cdft_core.registry import get_registry

    factory = get_registry().get("backbone", backbone).factory
    with torch.device("meta"):
        return factory(pretrained=False, weights=None, image_size=image_size, grad_checkpointing=False)


def _measure(backbone: str, image_size: int | None) -> InputCost | None:
    import torch
    from torch import nn

    try:
        built = _build_meta(backbone, image_size)
        size = int(getattr(built, "image_size", None) or image_size or built.data_config["input_size"][-1])
        channels = int(built.data_config["input_size"][0])
    except UsageError:
        raise
    except Exception as exc:  # the constructor may refuse the size itself
        if image_size is None:
            return None
        _refuse_size(backbone, image_size, exc)
        return None  # not measurable even at its own size: the real build decides
    model = getattr(built, "model", built)
    stride = _stride(model)
    if stride and size < stride:
        _refuse_size(backbone, size, None)
    blocks = [child for module in model.modules() if isinstance(module, (nn.Sequential, nn.ModuleList))
              for child in module.children() if any(True for _ in child.parameters())]
    sizes: list[int] = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: sizes.append(_numel(out))) for block in blocks]
    built.eval()
    try:
        with torch.no_grad():
            tokens = built.tokens(torch.empty(1, channels, size, size, device="meta"))
    except Exception as exc:
        if image_size is None:
            return None  # not even the backbone's own size passes: meta tensors are not supported
        _refuse_size(backbone, size, exc)
        return None
    finally:
        for hook in hooks:
            hook.remove()
    return InputCost(
        backbone=backbone, image_size=size, default_size=image_size is None, stride=stride,
        tokens=int(tokens.shape[1]), width=int(tokens.shape[2]),
        parameters={f"backbone.{name}": p for name, p in built.named_parameters()},
        block_values=sum(sizes), largest_block=max(sizes, default=0),
    )


def _numel(output: Any) -> int:
    if hasattr(output, "numel"):
        return int(output.numel())
    if isinstance(output, (tuple, list)):
        return sum(_numel(item) for item in output)
    return 0


def _stride(model: Any) -> int | None:
    """A ViT's patch size or a CNN's total stride: timm's ``feature_info`` reduction, else the patch embedding's."""
    try:
        return int(model.feature_info[-1]["reduction"])
    except (AttributeError, LookupError, TypeError, ValueError):
        pass
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if isinstance(patch, (tuple, list)) and patch:
        return int(max(patch))
    return int(patch) if isinstance(patch, int) else None


def _works(backbone: str, size: int) -> bool:
    try:
        return input_cost(backbone, size) is not None
    except UsageError:
        return False


def _refuse_size(backbone: str, size: int, exc: BaseException | None) -> None:
    """Raise the one-line error for an image size the backbone cannot take, with sizes that
    work; return quietly when the backbone cannot be measured at all (a plugin whose
    constructor does not run on the meta device): the real build then decides."""
    default = input_cost(backbone, None)
    if default is None:
        return
    stride = default.stride or 1
    patch = "one patch" if stride > 1 else "one pixel"
    kind = "patch" if _is_patch(backbone) else "total stride"
    candidates = sorted({max(stride, stride * (size // stride)), stride * max(1, -(-size // stride))})
    if size < stride:
        smallest = next((c for c in (stride * k for k in range(1, 9)) if _works(backbone, c)), None)
        fix = f"use --image-size {smallest} or more" if smallest else f"use --image-size {default.image_size} (its own size)"
        raise UsageError(f"--image-size {size} is smaller than {patch} of backbone {backbone!r} "
                         f"({kind} {stride} px); {fix}") from None
    fitting = [c for c in candidates if c != size and _works(backbone, c)] or [default.image_size]
    raise UsageError(f"--image-size {size} does not fit backbone {backbone!r} ({one_line(exc, 160)}); "
                     f"use --image-size {' or '.join(str(c) for c in fitting)}") from None


def _is_patch(backbone: str) -> bool:
    cost = input_cost(backbone, None)
    return cost is not None and any(".patch_embed." in name for name in cost.parameters)


def _device_of(config: RunConfig) -> str:
    if config.device != "auto":
        return config.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def trains_backbone(strategy: Strategy, cost: InputCost) -> bool:
    """Whether some stage of ``strategy`` trains a backbone parameter (from its label functions)."""
    from cdft_core.functional.pytree import FROZEN

    for stage in strategy.stages:
        try:
            labels = stage.label_fn(cost.parameters)
        except Exception:  # a label function that needs the whole model: assume it trains
            return True
        if any(labels.get(name, FROZEN) != FROZEN for name in cost.parameters):
            return True
    return False


def needed_bytes(cost: InputCost, *, batch_size: int, eval_batch_size: int, trains: bool, value_bytes: int,
                 backward: bool | None = None) -> int:
    """The floor of one process's memory for this backbone and batch (see the module docstring).

    ``trains``: the backbone's own parameters train; ``backward``: a backward pass runs through
    the backbone (default: ``trains``; also true when a strategy adds trained layers inside it).
    """
    backward = trains if backward is None else backward
    params = cost.parameter_count * (TRAINED_PARAM_BYTES if trains else FROZEN_PARAM_BYTES)
    train = batch_size * (cost.block_values if backward else 2 * cost.largest_block)
    evaluation = eval_batch_size * 2 * cost.largest_block
    return params + max(train, evaluation) * value_bytes


def available_bytes(device: str) -> tuple[int, str] | None:
    """(bytes, what they are) this process may still use on ``device``; None when unknown."""
    if device.startswith("cuda"):
        import torch

        try:
            free, _ = torch.cuda.mem_get_info(torch.device(device))
        except (RuntimeError, AssertionError):
            return None
        return int(free), f"free memory of {device}"
    values = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    if not values:
        try:
            values = [os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
        except (ValueError, OSError, AttributeError):
            return None
    processes = max(1, _int_env("LOCAL_WORLD_SIZE", 1))
    share = f" (shared by {processes} processes)" if processes > 1 else ""
    return min(values) // processes, f"available RAM{share}"


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available() -> int | None:
    """The room left under a cgroup v2 memory limit (containers, batch schedulers); None without one."""
    try:
        with open("/sys/fs/cgroup/memory.max") as handle:
            limit = handle.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as handle:
            current = int(handle.read().strip())
        return max(0, int(limit) - current)
    except (OSError, ValueError):
        return None


def _int_env(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def check_memory(config: RunConfig, strategy: Strategy, device: str, *, cost: InputCost | None = None,
                 available: tuple[int, str] | None = None) -> None:
    """Refuse an image size and batch whose floor (:func:`needed_bytes`) exceeds the memory
    available on ``device``, naming ``--image-size``/``--batch-size`` and values that fit."""
    cost = cost or input_cost(config.backbone, config.image_size)
    available = available or available_bytes(device)
    if cost is None or available is None:
        return
    free, where = available
    trains = trains_backbone(strategy, cost)
    backward = trains or strategy.change_model is not None  # e.g. LoRA inside the frozen backbone
    value_bytes = 2 if resolve_precision(config.precision, "cuda" if device.startswith("cuda") else "cpu") in ("bf16", "fp16") else 4

    def need(c: InputCost, batch: int = config.batch_size) -> int:
        return needed_bytes(c, batch_size=batch, eval_batch_size=config.eval_batch_size or 2 * batch,
                            trains=trains, value_bytes=value_bytes, backward=backward)

    needed = need(cost)
    if needed <= free:
        return
    size_option = f"--image-size {cost.image_size}" + (" (the backbone's own size)" if cost.default_size else "")
    fixes = []
    fit = _largest_fitting_size(cost, free, need)
    if fit is not None:
        own = input_cost(cost.backbone, None)
        hint = f", the backbone's own size is {own.image_size}" if own is not None and own.image_size < fit else ""
        fixes.append(f"--image-size {fit} or less{hint}")
    batch = max((b for b in _batch_candidates(config.batch_size) if need(cost, b) <= free), default=None)
    if batch is not None:
        fixes.append(f"--batch-size {batch}")
    fix = f"use {' or '.join(fixes)}" if fixes else "use a machine with more memory or a smaller backbone"
    raise UsageError(
        f"{size_option} with --batch-size {config.batch_size} needs at least {_gib(needed)} for backbone "
        f"{cost.backbone!r} ({cost.tokens:,} tokens of width {cost.width} per image, {cost.parameter_count:,} "
        f"parameters), more than the {_gib(free)} {where}; {fix}"
    )


def _largest_fitting_size(cost: InputCost, free: int, need: Any) -> int | None:
    """The largest image size (a multiple of the stride, below the asked one) whose floor fits."""
    stride = cost.stride or 1
    size, current = cost.image_size, cost
    for _ in range(12):
        ratio = min(0.9, math.sqrt(free / max(need(current), 1)))  # activations grow with the token count
        size = stride * int(size * ratio // stride)
        if size < stride:
            return None
        try:
            current = input_cost(cost.backbone, size)
        except UsageError:
            continue
        if current is None:
            return None
        if need(current) <= free:
            return size
    return None


def _batch_candidates(batch_size: int) -> list[int]:
    """1, 2, 4, ... below ``batch_size``."""
    return [b for b in (2**k for k in range(32)) if b < batch_size]


def _gib(count: int) -> str:
    if count >= 1 << 40:
        return f"{count / (1 << 40):,.1f} TiB"
    return f"{count / (1 << 30):.1f} GiB"
