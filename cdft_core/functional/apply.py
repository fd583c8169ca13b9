"""The functional core: a model applied to an explicit parameter tree, and its gradients.

The ordinary training loop keeps the weights inside the ``nn.Module`` and lets autograd
discover what to differentiate from ``requires_grad``. The functional view, borrowed from
JAX/Equinox, makes the weights an argument instead::

    trainable, frozen = split(model, labels)           # partition *before* differentiating
    loss_fn = make_loss_fn(model)                      # loss_fn(trainable, frozen, batch)
    grads, loss = grad_and_value(loss_fn)(trainable, frozen, batch)

Only ``trainable`` is differentiated; ``frozen`` leaves are plain detached tensors, so they
cost no gradient work and no gradient memory — the same meaning "frozen" has for the
strategies (:mod:`cdft_core.strategy`), where frozen parameters are excluded from autograd,
never merely given zero updates. The gradients equal those of ``loss.backward()`` on the
module (tested), which is what lets the vectorised heads (:mod:`cdft_core.functional.vmap_heads`)
and the JAX interop (:mod:`cdft_core.functional.jax_interop`) stand on the same weights as the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from cdft_core.functional import pytree
from cdft_core.functional.pytree import FROZEN, Tree

#: ``loss_fn(trainable, frozen, batch) -> scalar`` — the function that is differentiated.
LossFn = Callable[[Tree, Tree, Any], torch.Tensor]


def apply(model: torch.nn.Module, params: Tree, buffers: Tree | None, x: Any) -> Any:
    """Run ``model(x)`` with the given parameters and buffers instead of its own.

    Both trees may be nested or flat; names the trees do not mention come from the module
    itself. Holes are refused: combine the halves of a partition first (a hole would
    silently fall back to the module's own tensor, which is rarely what was meant).
    """
    flat = pytree.flatten(params)
    if buffers is not None:
        flat_buffers = pytree.flatten(buffers)
        clash = flat.keys() & flat_buffers.keys()
        if clash:
            raise ValueError(f"apply: names in both params and buffers: {sorted(clash)[:3]}")
        flat.update(flat_buffers)
    holes = [name for name, leaf in flat.items() if leaf is None]
    if holes:
        raise ValueError(f"apply: {len(holes)} holes (e.g. {holes[0]!r}); pass pytree.combine(trainable, frozen)")
    return functional_call(model, flat, (x,), strict=False)


def split(model: torch.nn.Module, labels: Mapping[str, str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's parameters as ``(trainable, frozen)`` flat trees with holes.

    ``labels`` maps every parameter name to a label (a strategy's labelling, see
    :func:`cdft_core.strategy.apply_stage`); ``frozen`` leaves go to the second tree.
    Without labels, the module's own ``requires_grad`` flags decide. Leaves are detached.
    """
    params = pytree.parameters(model, detach=True, nested=False)
    if labels is None:
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        return pytree.partition(params, lambda name, _leaf: name in trainable)
    missing = [name for name in params if name not in labels]
    if missing:
        raise ValueError(f"split: {len(missing)} parameters have no label (e.g. {missing[0]!r})")
    return pytree.partition(params, lambda name, _leaf: labels[name] != FROZEN)


def make_loss_fn(
    model: torch.nn.Module,
    *,
    buffers: Tree | None = None,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> LossFn:
    """``loss_fn(trainable, frozen, batch)`` for a classification batch ``(x, y)``.

    ``buffers`` default to the module's own. The function is pure in its arguments: it
    reads no parameter from the module, so ``torch.func.grad``/``vmap`` can transform it.
    """

    def loss_fn(trainable: Tree, frozen: Tree, batch: Any) -> torch.Tensor:
        x, y = batch
        params = pytree.combine(trainable, frozen)
        return criterion(apply(model, params, buffers, x), y)

    return loss_fn


def grad_and_value(loss_fn: LossFn) -> Callable[[Tree, Tree, Any], tuple[dict[str, Any], torch.Tensor]]:
    """``(grads, loss)`` of ``loss_fn`` with respect to its first argument only.

    ``trainable`` may carry holes (the output of :func:`split`); only its leaves are
    differentiated, and ``grads`` come back in its shape with the same holes. ``torch.func``
    refuses ``None`` leaves, hence the compact/fill round trip around the transform.
    """

    def wrapped(trainable: Tree, frozen: Tree, batch: Any) -> tuple[dict[str, Any], torch.Tensor]:
        compacted = pytree.compact(trainable)

        def on_compact(leaves: dict[str, torch.Tensor]) -> torch.Tensor:
            return loss_fn(pytree.fill_holes(leaves, trainable), frozen, batch)

        grads, loss = torch.func.grad_and_value(on_compact)(compacted)
        return pytree.fill_holes(grads, trainable), loss

    return wrapped
