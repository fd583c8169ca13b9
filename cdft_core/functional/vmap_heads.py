"""Train several heads at once: ``torch.func.vmap`` over a stacked parameter tree.

A linear probe is cheap once the frozen backbone's features are computed, and the best
learning rate is not known in advance. Instead of one run per learning rate, stack ``n``
heads into one tree (every leaf gains a leading dimension ``n``) and let ``vmap`` run the
forward pass, the gradient and the optimiser update of all of them on the same batch of
features in one call. Each head keeps its own hyper-parameters (a learning rate and,
optionally, a weight decay per head) and its own optimiser state; numerically it is the same as training each head alone
(tested against ``torch.optim`` on separate ``nn.Linear`` heads).

A learning-rate sweep in a few lines::

    head = torch.nn.Linear(dim, num_classes)              # the template: shapes only
    params = init_heads(head, 4, seed=0)                   # 4 heads, same initial weights
    lrs = torch.tensor([1e-4, 3e-4, 1e-3, 3e-3])
    params, state, losses = train_heads(head, params, lrs, features, labels,
                                        optimizer=adam(), epochs=10, batch_size=64)
    accuracy = heads_accuracy(head, params, val_features, val_labels)   # shape (4,)
    best = unstack(params)[int(accuracy.argmax())]         # a plain state dict for `head`

The template module can be any head or adapter whose forward is ``module(x)``; only its
parameter shapes and forward code are used, never its own weights.

The optimisers here are pure functions (optax-style ``init``/``update``), because a
``torch.optim`` optimiser mutates Python-side state that ``vmap`` cannot batch. They
follow ``torch.optim.SGD`` and ``torch.optim.Adam`` exactly, including their L2-style
``weight_decay``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from cdft_core.functional import pytree
from cdft_core.functional.pytree import Tree, stack, unstack

__all__ = [
    "FunctionalOptimizer",
    "adam",
    "heads_accuracy",
    "heads_forward",
    "init_heads",
    "make_step",
    "sgd",
    "stack",
    "train_heads",
    "unstack",
]


class FunctionalOptimizer(NamedTuple):
    """An optimiser as two pure functions over one head's trees.

    ``init(params) -> state`` and ``update(grads, state, params, lr, weight_decay=None) ->
    (params, state)``; ``lr`` (and ``weight_decay``, which replaces the optimiser's own when
    given) are 0-d tensors so that ``vmap`` can give every head its own.
    """

    init: Callable[[Tree], Tree]
    update: Callable[..., tuple[Tree, Tree]]


def sgd(momentum: float = 0.0, weight_decay: float = 0.0) -> FunctionalOptimizer:
    """Stochastic gradient descent as ``torch.optim.SGD`` (no dampening, no Nesterov)."""

    def init(params: Tree) -> Tree:
        return {"momentum": pytree.tree_map(torch.zeros_like, params)}

    def update(grads: Tree, state: Tree, params: Tree, lr: torch.Tensor,
               decay: torch.Tensor | None = None) -> tuple[Tree, Tree]:
        grads = _decayed(grads, params, weight_decay if decay is None else decay)
        if momentum:
            # torch seeds the buffer with the first gradient; 0 * 0 + g does the same.
            buf = pytree.tree_map(lambda b, g: momentum * b + g, state["momentum"], grads)
            state = {"momentum": buf}
            grads = buf
        return pytree.tree_map(lambda p, g: p - lr * g, params, grads), state

    return FunctionalOptimizer(init, update)


def adam(betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> FunctionalOptimizer:
    """Adam as ``torch.optim.Adam`` (bias-corrected moments, L2 ``weight_decay``)."""
    beta1, beta2 = betas

    def init(params: Tree) -> Tree:
        zeros = pytree.tree_map(torch.zeros_like, params)
        device = next(iter(pytree.leaves(params))).device  # the step counter lives beside the weights (CUDA)
        return {"step": torch.zeros((), device=device), "m": zeros, "v": pytree.tree_map(torch.zeros_like, params)}

    def update(grads: Tree, state: Tree, params: Tree, lr: torch.Tensor,
               decay: torch.Tensor | None = None) -> tuple[Tree, Tree]:
        grads = _decayed(grads, params, weight_decay if decay is None else decay)
        step = state["step"] + 1
        m = pytree.tree_map(lambda m, g: beta1 * m + (1 - beta1) * g, state["m"], grads)
        v = pytree.tree_map(lambda v, g: beta2 * v + (1 - beta2) * g * g, state["v"], grads)
        step_size = lr / (1 - beta1**step)
        root_correction = torch.sqrt(1 - beta2**step)
        new = pytree.tree_map(lambda p, m, v: p - step_size * m / (v.sqrt() / root_correction + eps), params, m, v)
        return new, {"step": step, "m": m, "v": v}

    return FunctionalOptimizer(init, update)


def _decayed(grads: Tree, params: Tree, weight_decay: float | torch.Tensor) -> Tree:
    """``grads + weight_decay · params`` (torch.optim's L2 ``weight_decay``); unchanged for a plain 0."""
    if isinstance(weight_decay, (int, float)) and not weight_decay:
        return grads
    return pytree.tree_map(lambda g, p: g + weight_decay * p, grads, params)


def init_heads(template: torch.nn.Module, n: int, *, seed: int | None = 0, same_init: bool = True) -> dict[str, Any]:
    """``n`` stacked copies of the template's parameters (flat tree, leading dim ``n``).

    ``same_init=True`` gives every head the same initial weights (re-initialised from
    ``seed`` with the module's own ``reset_parameters``), so that a sweep compares only the
    hyper-parameters; ``False`` draws each head independently. ``seed=None`` keeps the
    template's current weights for every head.
    """
    if n < 1:
        raise ValueError("init_heads: n must be at least 1")
    copies = []
    generator_state = torch.random.get_rng_state()
    try:
        for i in range(n):
            module = _fresh_copy(template)
            if seed is not None:
                torch.manual_seed(seed if same_init else seed + i)
                _reset(module)
            copies.append(pytree.parameters(module, nested=False))
    finally:
        torch.random.set_rng_state(generator_state)
    return stack(copies)


def heads_forward(template: torch.nn.Module, params: Tree, x: torch.Tensor) -> torch.Tensor:
    """The outputs of every head on the same input: shape ``(n, *template(x).shape)``."""

    def one(p: Tree, inputs: torch.Tensor) -> torch.Tensor:
        return functional_call(template, pytree.flatten(p), (inputs,))

    return vmap(one, in_dims=(0, None))(params, x)


def make_step(
    template: torch.nn.Module,
    optimizer: FunctionalOptimizer,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> Callable[[Tree, Tree, torch.Tensor, torch.Tensor, torch.Tensor], tuple[Tree, Tree, torch.Tensor]]:
    """One vmapped training step: ``step(params, state, lrs, x, y, weight_decays=None) ->
    (params, state, losses)``.

    ``params``/``state`` are stacked over heads, ``lrs`` (and ``weight_decays``, when a
    sweep varies it: it replaces the optimiser's own) have one entry per head, and the
    batch ``(x, y)`` is shared by all heads (not copied).
    """

    def loss_of(p: Tree, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss(functional_call(template, pytree.flatten(p), (x,)), y)

    def one(p: Tree, state: Tree, lr: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
            decay: torch.Tensor | None = None) -> tuple[Tree, Tree, torch.Tensor]:
        grads, value = grad_and_value(loss_of)(p, x, y)
        new_p, new_state = optimizer.update(grads, state, p, lr, decay)
        return new_p, new_state, value

    shared_decay = vmap(one, in_dims=(0, 0, 0, None, None))
    own_decay = vmap(one, in_dims=(0, 0, 0, None, None, 0))

    def step(params: Tree, state: Tree, lrs: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
             weight_decays: torch.Tensor | None = None) -> tuple[Tree, Tree, torch.Tensor]:
        if weight_decays is None:
            return shared_decay(params, state, lrs, x, y)
        return own_decay(params, state, lrs, x, y, weight_decays)

    return step


def train_heads(
    template: torch.nn.Module,
    params: Tree,
    lrs: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    optimizer: FunctionalOptimizer,
    epochs: int = 1,
    batch_size: int | None = None,
    state: Tree | None = None,
    shuffle_seed: int | None = None,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    weight_decays: torch.Tensor | None = None,
) -> tuple[dict[str, Any], Tree, torch.Tensor]:
    """Train the stacked heads on pre-computed (frozen) features; returns the final
    ``(params, optimizer_state, losses)`` with ``losses`` of shape ``(steps, n)``.
    ``weight_decays`` (one per head) replaces the optimiser's own weight decay.

    Every head sees the same mini-batches in the same order (``shuffle_seed=None``: the
    data order as given), so heads differ only by their learning rates and initial weights.
    """
    n = lrs.shape[0]
    sizes = {leaf.shape[0] for leaf in pytree.leaves(params)}
    if sizes != {n}:
        raise ValueError(f"train_heads: {n} learning rates for stacked heads of size {sorted(sizes)}")
    lrs = lrs.to(dtype=features.dtype, device=features.device)
    if weight_decays is not None:
        if weight_decays.shape != lrs.shape:
            raise ValueError(f"train_heads: {weight_decays.shape[0]} weight decays for {n} learning rates")
        weight_decays = weight_decays.to(dtype=features.dtype, device=features.device)
    if state is None:
        state = vmap(optimizer.init)(params)
    step = make_step(template, optimizer, loss)
    count = features.shape[0]
    batch_size = batch_size or count
    generator = torch.Generator().manual_seed(shuffle_seed) if shuffle_seed is not None else None
    history = []
    for _ in range(epochs):
        order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
        for start in range(0, count, batch_size):
            index = order[start : start + batch_size].to(features.device)
            params, state, losses = step(params, state, lrs, features[index], labels[index], weight_decays)
            history.append(losses)
    return params, state, torch.stack(history) if history else torch.empty(0, n)


@torch.no_grad()
def heads_accuracy(template: torch.nn.Module, params: Tree, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Accuracy of each head on the given features: shape ``(n,)``, to pick a sweep's winner."""
    predictions = heads_forward(template, params, features).argmax(-1)
    return (predictions == labels.unsqueeze(0)).float().mean(-1)


def _fresh_copy(template: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(template)


def _reset(module: torch.nn.Module) -> None:
    resettable = [m for m in module.modules() if hasattr(m, "reset_parameters")]
    if not resettable and any(True for _ in module.parameters()):
        raise ValueError(f"init_heads: {type(module).__name__} has no reset_parameters(); pass seed=None")
    for sub in resettable:
        sub.reset_parameters()
