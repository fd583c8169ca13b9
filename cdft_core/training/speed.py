"""The GPU step: the settings that make a CUDA training step fast, each one a small decision.

Each function decides one thing from the device (and the model, the optimizer class or the
worker count), so a test can check the decision on a machine without a GPU, and each
decides "as before" on CPU: a CPU run gives the same numbers, bit for bit, as without this
module (the engine's determinism and resume tests check that).

- :func:`use_channels_last`: NHWC weights and inputs for convolutional backbones (ConvNeXt,
  ResNet) on CUDA, where cuDNN's NHWC kernels are the fast ones; never for a ViT (its one
  convolution is the patch embedding) and never on CPU.
- :func:`optimizer_kwargs`: Adam(W)'s fused CUDA kernel (one launch for every parameter)
  when torch has it, else the ``foreach`` implementation; on CPU torch's own default.
- :func:`loader_kwargs`: pinned host memory on CUDA (so ``non_blocking`` copies overlap
  the step), and for worker processes ``persistent_workers`` and a deeper prefetch.
- :func:`configure_backends`: cuDNN autotuning (``cudnn.benchmark``) on CUDA. It picks the
  fastest convolution algorithm per shape, which may differ between runs: CUDA runs are not
  bit-reproducible anyway, CPU runs are and stay so.
- :func:`compile_model`: ``--compile``, :func:`torch.compile` of the model's forward in
  place (``nn.Module.compile``), so the state dict keeps its keys (no ``_orig_mod.``) and a
  DDP wrapper wraps the compiled module; ``--compile-mode`` picks inductor's mode.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

#: batches each loader worker keeps ready (torch's default is 2)
PREFETCH_FACTOR = 4

#: test-only: the torch.compile backend (``aot_eager`` traces and runs the same graphs
#: without generating code, for tests on machines where inductor would take minutes)
COMPILE_BACKEND_ENV = "CDFT_COMPILE_BACKEND"


def _device_type(device: torch.device | str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def is_convolutional(model: nn.Module) -> bool:
    """Whether ``model`` is a convolutional network: more than one 2-D convolution.

    A ViT has exactly one (its patch embedding), which NHWC does not speed up; a ConvNeXt or
    ResNet has dozens. Counting modules, not names, covers plugin backbones too.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            count += 1
            if count > 1:
                return True
    return False


def use_channels_last(model: nn.Module, device: torch.device | str) -> bool:
    """NHWC (``torch.channels_last``) for a convolutional model on CUDA; never on CPU."""
    return _device_type(device) == "cuda" and is_convolutional(model)


def to_device(batch: torch.Tensor, device: torch.device | str, channels_last: bool) -> torch.Tensor:
    """``batch`` on ``device``, without waiting for the copy (pinned memory makes it asynchronous);
    a 4-D image batch in NHWC when the model is. Other batches (stored features of a frozen
    stage) keep their layout: NHWC means nothing to them."""
    fmt = torch.channels_last if channels_last and batch.dim() == 4 else torch.preserve_format
    return batch.to(device, non_blocking=True, memory_format=fmt)


def optimizer_kwargs(device: torch.device | str, optimizer_cls: type = torch.optim.Adam) -> dict[str, Any]:
    """The implementation switches for ``optimizer_cls``: fused on CUDA when that class has a
    fused kernel, else foreach; nothing on CPU (torch's default there, so CPU results stay
    exactly as they were)."""
    if _device_type(device) != "cuda":
        return {}
    if "fused" in inspect.signature(optimizer_cls).parameters:
        return {"fused": True}
    return {"foreach": True}


def with_implementation(state: Mapping[str, Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A saved optimizer state whose groups ask for this run's implementation.

    ``Optimizer.load_state_dict`` takes every group setting from the saved state, ``fused``
    and ``foreach`` too, and places the ``step`` counters by the saved ``fused`` flag. A
    state saved by a CPU run must resume fused on CUDA and the other way round, so the
    implementation switches are replaced by the ones this run builds with.
    """
    flags = {"fused": kwargs.get("fused"), "foreach": kwargs.get("foreach")}
    return {**state, "param_groups": [{**group, **flags} for group in state["param_groups"]]}


def match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give each state tensor its parameter's memory layout (after loading a saved state).

    Saved states are written contiguous; a channels_last parameter's moments must be
    channels_last as well, as fresh ones are (``zeros_like``), for the fused and foreach
    kernels to pair elements correctly and fast. A no-op for contiguous parameters (CPU).
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def loader_kwargs(device: torch.device | str | None, workers: int, persistent: bool = True) -> dict[str, Any]:
    """DataLoader options: pinned memory for CUDA; with workers, persistent ones (when the
    loader is reused for every epoch) and :data:`PREFETCH_FACTOR` batches each.

    ``device`` None: pin when CUDA is available (callers that do not know the device).
    """
    kwargs: dict[str, Any] = {"pin_memory": _device_type(device) == "cuda", "persistent_workers": False}
    if workers > 0:
        kwargs.update(persistent_workers=persistent, prefetch_factor=PREFETCH_FACTOR)
    return kwargs


def configure_backends(device: torch.device | str) -> None:
    """cuDNN autotuning on CUDA (the first batch of each shape tries the algorithms)."""
    if _device_type(device) == "cuda":
        torch.backends.cudnn.benchmark = True


def compile_backend() -> str:
    """``inductor``, unless the test-only ``CDFT_COMPILE_BACKEND`` names another."""
    return os.environ.get(COMPILE_BACKEND_ENV) or "inductor"


def compile_model(model: nn.Module, mode: str = "default") -> nn.Module:
    """Compile ``model``'s forward in place and return it (``--compile``, ``--compile-mode``).

    In place keeps ``model.state_dict()`` keys as they were, so checkpoints, resume states
    and ``cdft eval`` see the same names with and without ``--compile``. Static shapes: the
    first batch of each shape and mode (train, eval, each stage) compiles its own graph,
    so the full training batch never runs a slower dynamic-shape graph made for an epoch's
    short last batch; past torch's recompile limit a new shape runs eagerly.

    ``mode`` is inductor's (``max-autotune`` times candidate kernels for every matrix
    product, ``reduce-overhead`` replays CUDA graphs); another backend (the tests'
    ``aot_eager``) has no modes, so none is passed to it.
    """
    backend = compile_backend()
    options = {"mode": mode} if backend == "inductor" and mode != "default" else {}
    model.compile(backend=backend, dynamic=False, **options)
    return model


def describe(device: torch.device | str, *, channels_last: bool, optimizer_cls: type, workers: int,
             compiled: bool, compile_mode: str = "default") -> str:
    """The log's words for what is on: ``channels_last, fused adam, pinned memory, ...``."""
    parts = []
    if _device_type(device) == "cuda":
        parts.append("cuDNN autotuning")
        if channels_last:
            parts.append("channels_last")
        impl = optimizer_kwargs(device, optimizer_cls)
        parts.append(f"{'fused' if impl.get('fused') else 'foreach'} {optimizer_cls.__name__}")
        parts.append("pinned memory, non-blocking copies")
    if workers > 0:
        parts.append(f"persistent loader workers (prefetch {PREFETCH_FACTOR})")
    if compiled:
        mode = "" if compile_mode == "default" else f", mode {compile_mode}"
        parts.append(f"torch.compile ({compile_backend()}{mode})")
    return ", ".join(parts) or "eager, as on any CPU"
