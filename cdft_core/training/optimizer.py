"""A stage's optimizer and grad scaler, built from its labels — or from a saved state.

Builders in the torchtune way: given the saved state of an interrupted stage they
restore it, otherwise they start afresh, so the training loop never asks which.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from cdft_core.config import RunConfig
from cdft_core.strategy import Stage, param_groups
from cdft_core.training.speed import match_state_layout, optimizer_kwargs, with_implementation


def build_optimizer(model: torch.nn.Module, labels: Mapping[str, str], stage: Stage, config: RunConfig,
                    saved: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    """Adam(W) over the stage's trainable label groups; each group's ``base_lr`` is
    ``lr × stage.lr_factor × lr_scale`` (docs/method.md#learning-rates).

    On CUDA the fused kernel (else foreach) does the update; on CPU torch's default, as
    always (:func:`~cdft_core.training.speed.optimizer_kwargs`). A saved state resumes with
    either implementation: the state dict is the same apart from the switches, which are
    this run's (:func:`~cdft_core.training.speed.with_implementation`).
    """
    groups = param_groups(model, labels, stage, config.lr, config.weight_decay)
    optimizer_cls = optimizer_class(config)
    device = next((p.device for group in groups for p in group["params"]), torch.device("cpu"))
    kwargs = optimizer_kwargs(device, optimizer_cls)
    optimizer = optimizer_cls(groups, lr=config.lr, **kwargs)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    if saved is not None:
        optimizer.load_state_dict(with_implementation(saved, kwargs))
        match_state_layout(optimizer)
    return optimizer


def optimizer_class(config: RunConfig) -> type[torch.optim.Optimizer]:
    """``torch.optim.Adam`` (the paper's) or ``AdamW``, as ``config.optimizer`` says."""
    return torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam


def build_scaler(precision: str, saved: dict[str, Any] | None = None) -> torch.amp.GradScaler | None:
    """A grad scaler for fp16 (bf16 and fp32 need none)."""
    if precision != "fp16":
        return None
    scaler = torch.amp.GradScaler("cuda")
    if saved:
        scaler.load_state_dict(saved)
    return scaler


def trainable_count(optimizer: torch.optim.Optimizer) -> int:
    return sum(p.numel() for group in optimizer.param_groups for p in group["params"])
