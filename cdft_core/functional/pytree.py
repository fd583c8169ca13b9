"""A model's parameters and buffers as a pytree, with Equinox-style partition and combine.

A *tree* is a dict keyed by module path. It comes in two spellings of the same thing:

- **nested**: ``{"backbone": {"blocks": {"0": {"norm1": {"weight": t}}}}, "head": {...}}``
  — the shape of the module hierarchy, convenient for picking whole sub-modules;
- **flat**: ``{"backbone.blocks.0.norm1.weight": t, ...}`` — exactly the ``state_dict``
  names, which is what :func:`torch.func.functional_call` and the strategies' label
  functions consume.

:func:`flatten` and :func:`unflatten` convert between them; every other function here
accepts either spelling and answers in the spelling it was given. Leaves are tensors
(anything that is not a mapping), or ``None``: a *hole*, as in Equinox, marking a leaf that
belongs to the other half of a :func:`partition`. Keeping the holes keeps both halves the
same shape as the whole, so :func:`combine` can put them back together and a half can be
handed to ``torch.func.grad`` (via :func:`compact`) without guessing what is missing.

This module imports torch only inside the functions that build or stack tensors, so
strategy plugins that only label names stay cheap to import.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from cdft_core.errors import UsageError

if TYPE_CHECKING:
    import torch

#: The label that means "excluded from autograd and from the optimiser".
FROZEN = "frozen"

#: A tree: nested or flat mapping of module paths to tensors (or ``None`` holes).
Tree = Mapping[str, Any]

#: The labels a partition spec can be: a function of ``(name, leaf)``, a flat or nested
#: mapping of names to booleans, or a mapping of names to label strings with ``select=``.
Spec = Callable[[str, Any], bool] | Mapping[str, Any]


def is_nested(tree: Tree) -> bool:
    """True when the tree has at least one sub-mapping (the nested spelling)."""
    return any(isinstance(value, Mapping) for value in tree.values())


def flatten(tree: Tree, prefix: str = "") -> dict[str, Any]:
    """The flat spelling: dotted module paths to leaves, in the tree's order.

    Flattening a flat tree returns an equal copy, so callers need not know which spelling
    they hold. An empty sub-mapping (a module without parameters) leaves no entry.
    """
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        else:
            if name in flat:
                raise ValueError(f"tree has two leaves named {name!r}")
            flat[name] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The nested spelling of a flat tree (``"a.b.c": t`` becomes ``{"a": {"b": {"c": t}}}``)."""
    nested: dict[str, Any] = {}
    for name, value in flatten(flat).items():
        node = nested
        parts = name.split(".")
        for depth, part in enumerate(parts[:-1], start=1):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"leaf {'.'.join(parts[:depth])!r} is also a module path in {name!r}")
            node = child
        if isinstance(node.get(parts[-1]), dict):
            raise ValueError(f"leaf {name!r} is also a module path")
        node[parts[-1]] = value
    return nested


def spelled_like(tree: Tree, flat: dict[str, Any]) -> dict[str, Any]:
    """``flat`` in the spelling (nested or flat) of ``tree``: how every function here answers."""
    return unflatten(flat) if is_nested(tree) else flat


def parameters(model: torch.nn.Module, *, detach: bool = True, nested: bool = True) -> dict[str, Any]:
    """The model's parameters as a tree.

    ``detach=True`` (the default) gives plain tensors that share storage with the model
    but carry no autograd history: the right input for the ``torch.func`` transforms,
    which decide themselves what to differentiate.
    """
    flat = {name: (p.detach() if detach else p) for name, p in model.named_parameters()}
    return unflatten(flat) if nested else flat


def buffers(model: torch.nn.Module, *, nested: bool = True) -> dict[str, Any]:
    """The model's buffers (running statistics, position ids, ...) as a tree."""
    flat = {name: b for name, b in model.named_buffers()}
    return unflatten(flat) if nested else flat


def tree_map(fn: Callable[..., Any], tree: Tree, *rest: Tree) -> dict[str, Any]:
    """Apply ``fn`` leaf by leaf across trees of the same names; holes stay holes.

    A leaf that is ``None`` in the first tree is a hole in the result, so optimiser
    updates written with ``tree_map`` never touch the other half of a partition.
    """
    flat = flatten(tree)
    others = [flatten(t) for t in rest]
    for other in others:
        _same_names(flat, other, "tree_map")
    out = {name: (None if leaf is None else fn(leaf, *(o[name] for o in others))) for name, leaf in flat.items()}
    return spelled_like(tree, out)


def leaves(tree: Tree) -> list[Any]:
    """The non-hole leaves, in order."""
    return [leaf for leaf in flatten(tree).values() if leaf is not None]


def _selection(flat: Mapping[str, Any], spec: Spec, select: str | Iterable[str] | None) -> dict[str, bool]:
    """Turn any partition spec into ``{name: selected}`` covering every leaf of ``flat``."""
    if callable(spec) and not isinstance(spec, Mapping):
        return {name: bool(spec(name, leaf)) for name, leaf in flat.items()}
    spec_flat = flatten(spec)
    missing = [name for name in flat if name not in spec_flat]
    extra = [name for name in spec_flat if name not in flat]
    if missing or extra:
        raise ValueError(
            f"partition spec does not match the tree: {len(missing)} leaves without a label "
            f"(e.g. {missing[:3]}), {len(extra)} labels for no leaf (e.g. {extra[:3]})"
        )
    if select is None:
        bad = sorted({type(v).__name__ for v in spec_flat.values() if not isinstance(v, bool)})
        if bad:
            raise ValueError(f"a spec of labels ({', '.join(bad)}) needs select= naming the label(s) to keep")
        return {name: spec_flat[name] for name in flat}
    wanted = {select} if isinstance(select, str) else set(select)
    present = set(spec_flat.values())
    if not wanted <= present:
        raise UsageError(
            f"partition: select names label(s) {', '.join(map(repr, sorted(wanted - present)))} that no leaf has; "
            f"labels of the leaves: {', '.join(sorted(map(str, present)))}"
        )
    return {name: spec_flat[name] in wanted for name in flat}


def partition(
    tree: Tree, spec: Spec, *, select: str | Iterable[str] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a tree in two trees of the same shape: ``(selected, rest)``, with ``None`` holes.

    ``spec`` is, as in Equinox's filter specs, either a predicate ``(name, leaf) -> bool``
    over flat names, or a (flat or nested) tree of booleans with the same leaves; or, as
    in optax's parameter labels, a tree of label strings together with ``select`` naming
    the label or labels that go to ``selected``. ``combine(selected, rest)`` gives the
    tree back.
    """
    flat = flatten(tree)
    chosen = _selection(flat, spec, select)
    selected = {name: (leaf if chosen[name] else None) for name, leaf in flat.items()}
    rest = {name: (None if chosen[name] else leaf) for name, leaf in flat.items()}
    return spelled_like(tree, selected), spelled_like(tree, rest)


def combine(*trees: Tree) -> dict[str, Any]:
    """Merge trees of the same names leaf by leaf: the first leaf that is not a hole wins."""
    if not trees:
        raise ValueError("combine needs at least one tree")
    flats = [flatten(t) for t in trees]
    for other in flats[1:]:
        _same_names(flats[0], other, "combine")
    out = {name: next((f[name] for f in flats if f[name] is not None), None) for name in flats[0]}
    return spelled_like(trees[0], out)


def compact(tree: Tree) -> dict[str, Any]:
    """The flat tree without its holes: what ``torch.func`` transforms accept as input."""
    return {name: leaf for name, leaf in flatten(tree).items() if leaf is not None}


def fill_holes(compacted: Mapping[str, Any], like: Tree) -> dict[str, Any]:
    """Put a compacted tree back into the shape of ``like`` (missing names become holes)."""
    flat = flatten(like)
    unknown = [name for name in compacted if name not in flat]
    if unknown:
        raise ValueError(f"fill_holes: names not in the tree: {unknown[:3]}")
    return spelled_like(like, {name: compacted.get(name) for name in flat})


def stack(trees: Iterable[Tree]) -> dict[str, Any]:
    """Stack trees of the same names and shapes along a new leading dimension (for vmap)."""
    import torch

    trees = list(trees)
    if not trees:
        raise ValueError("stack needs at least one tree")
    flats = [flatten(t) for t in trees]
    for other in flats[1:]:
        _same_names(flats[0], other, "stack")
    out = {
        name: None if flats[0][name] is None else torch.stack([f[name] for f in flats])
        for name in flats[0]
    }
    return spelled_like(trees[0], out)


def unstack(tree: Tree) -> list[dict[str, Any]]:
    """The inverse of :func:`stack`: one tree per index of the leading dimension."""
    flat = flatten(tree)
    sizes = {leaf.shape[0] for leaf in flat.values() if leaf is not None}
    if len(sizes) != 1:
        raise ValueError(f"unstack: leaves disagree on the leading dimension ({sorted(sizes)})")
    (n,) = sizes
    return [spelled_like(tree, {name: None if leaf is None else leaf[i] for name, leaf in flat.items()}) for i in range(n)]


def check_labels(labels: Mapping[str, str], settings: Mapping[str, Any], *, what: str = "strategy") -> None:
    """Every label in use must have settings (``frozen`` needs none), as optax insists.

    Raises :class:`~cdft_core.errors.UsageError` listing both sets, so a typo in a
    strategy's labels or its settings is found before any work and is easy to spot.
    """
    used = set(labels.values())
    known = set(settings) | {FROZEN}
    unknown = sorted(used - known)
    if unknown:
        raise UsageError(
            f"{what}: label(s) {', '.join(map(repr, unknown))} have no settings; "
            f"labels of the parameters: {', '.join(sorted(used))}; "
            f"labels with settings: {', '.join(sorted(known))}"
        )


def _same_names(a: Mapping[str, Any], b: Mapping[str, Any], what: str) -> None:
    if a.keys() != b.keys():
        only_a = [n for n in a if n not in b]
        only_b = [n for n in b if n not in a]
        raise ValueError(f"{what}: trees differ in their leaves (only in the first: {only_a[:3]}, only in another: {only_b[:3]})")
