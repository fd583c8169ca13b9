"""``--ema DECAY``: an exponential moving average of a stage's trainable weights.

After every optimizer step ``ema = decay·ema + (1 − decay)·param`` for each parameter that
trains in the stage, starting from its weights at the stage's start and restarted with
every stage. Validation runs on the average, model selection compares the average's
accuracy, and ``best.safetensors`` holds the averaged trainable weights with the live
model's frozen weights and buffers (BatchNorm statistics are copied, not averaged), so
``cdft eval`` of it reproduces the stage's test metrics. The resume state stores the
average beside the live weights, and a resumed run continues it exactly. Under DDP every
rank averages the same (all-reduced) parameters, so every rank holds the same average.

Why not torch's ``AveragedModel`` (with ``get_ema_multi_avg_fn``) or timm's ``ModelEmaV3``:
both deep-copy the whole model — a frozen ViT-B backbone again, for a stage that trains a
head and an adapter — and average every parameter (and buffer) rather than the stage's
trainable ones; ``AveragedModel`` also starts the average at its first update rather than
at the stage's start. What the stage needs is a dict of the trainable tensors, updated
with ``torch._foreach_lerp_`` (the kernel ``ModelEmaV3`` uses: ``ema += (1 − decay)·(param
− ema)``), which is also exactly what a resume state has to save.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch


class StageEma:
    """The average of the parameters of ``model`` (the plain model, not its DDP wrapper) that
    train now; ``saved``: the average of an interrupted stage, to continue from."""

    def __init__(self, model: torch.nn.Module, decay: float, saved: Mapping[str, torch.Tensor] | None = None) -> None:
        self.decay = decay
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if saved is not None and set(saved) != set(self.params):
            raise ValueError("the saved moving average does not hold this stage's trainable parameters")
        self.average = {name: (saved[name].to(p.device, p.dtype) if saved is not None else p.detach()).clone()
                        for name, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average, after an optimizer step."""
        torch._foreach_lerp_(list(self.average.values()), [p.detach() for p in self.params.values()],
                             1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged tensors by state-dict name (what a resume state saves)."""
        return dict(self.average)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the average inside the block (to evaluate it), its own weights after."""
        live = {name: p.detach().clone() for name, p in self.params.items()}
        _copy_into(self.params, self.average)
        try:
            yield
        finally:
            _copy_into(self.params, live)


@torch.no_grad()
def _copy_into(params: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]) -> None:
    for name, p in params.items():
        p.copy_(values[name])


def averaged(ema: StageEma | None) -> contextlib.AbstractContextManager:
    """``ema.applied()``, or nothing to do without ``--ema``."""
    return ema.applied() if ema is not None else contextlib.nullcontext()


def with_average(state: Mapping[str, torch.Tensor], average: Mapping[str, torch.Tensor] | None) -> dict:
    """A model state dict with the averaged trainable tensors in place of the live ones."""
    return {**state, **{name: value.to(state[name].device) for name, value in (average or {}).items()}}
