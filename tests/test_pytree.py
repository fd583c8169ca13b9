"""Parameter trees: flatten/unflatten, Equinox-style partition/combine, optax-style label checks."""

from __future__ import annotations

import pytest
import torch
from helpers_strategy import tiny_model

from cdft_core.errors import UsageError
from cdft_core.functional import pytree


def _tree():
    return {
        "backbone": {"blocks": {"0": {"weight": torch.ones(2, 2), "bias": torch.zeros(2)}}},
        "head": {"weight": torch.full((3, 2), 2.0), "bias": torch.arange(3.0)},
    }


def test_flatten_gives_state_dict_names_and_unflatten_inverts_it():
    tree = _tree()
    flat = pytree.flatten(tree)
    assert list(flat) == ["backbone.blocks.0.weight", "backbone.blocks.0.bias", "head.weight", "head.bias"]
    assert flat["head.bias"] is tree["head"]["bias"]
    assert pytree.unflatten(flat).keys() == tree.keys()
    assert pytree.flatten(pytree.unflatten(flat)) == flat
    assert pytree.flatten(flat) == flat  # flattening a flat tree is the identity


def test_unflatten_refuses_a_name_that_is_both_leaf_and_module():
    with pytest.raises(ValueError, match="also a module path"):
        pytree.unflatten({"a": torch.ones(1), "a.b": torch.ones(1)})


def test_model_tree_matches_named_parameters_and_buffers():
    model = tiny_model("test_convnext")
    params = pytree.parameters(model)
    assert pytree.is_nested(params)
    flat = pytree.flatten(params)
    assert list(flat) == [n for n, _ in model.named_parameters()]
    assert all(not leaf.requires_grad for leaf in flat.values())  # detached views ...
    name, param = next(iter(model.named_parameters()))
    assert flat[name].data_ptr() == param.data_ptr()  # ... of the same storage
    assert list(pytree.flatten(pytree.buffers(model))) == [n for n, _ in model.named_buffers()]


@pytest.mark.parametrize("nested", [True, False])
def test_partition_with_predicate_leaves_holes_and_combine_restores(nested):
    tree = _tree() if nested else pytree.flatten(_tree())
    selected, rest = pytree.partition(tree, lambda name, leaf: name.startswith("head."))
    assert pytree.is_nested(selected) == nested
    flat_sel, flat_rest = pytree.flatten(selected), pytree.flatten(rest)
    assert flat_sel.keys() == flat_rest.keys() == pytree.flatten(tree).keys()
    assert [n for n, v in flat_sel.items() if v is not None] == ["head.weight", "head.bias"]
    assert [n for n, v in flat_rest.items() if v is not None] == ["backbone.blocks.0.weight", "backbone.blocks.0.bias"]
    back = pytree.flatten(pytree.combine(selected, rest))
    assert all(back[n] is v for n, v in pytree.flatten(tree).items())


def test_partition_with_bool_tree_and_with_labels():
    tree = _tree()
    mask = pytree.tree_map(lambda leaf: leaf.ndim == 2, tree)
    selected, _ = pytree.partition(tree, mask)
    assert [n for n, v in pytree.flatten(selected).items() if v is not None] == ["backbone.blocks.0.weight", "head.weight"]

    labels = {"backbone.blocks.0.weight": "frozen", "backbone.blocks.0.bias": "frozen", "head.weight": "trainable", "head.bias": "trainable"}
    trainable, frozen = pytree.partition(tree, labels, select="trainable")
    assert pytree.compact(trainable).keys() == {"head.weight", "head.bias"}
    assert pytree.compact(frozen).keys() == {"backbone.blocks.0.weight", "backbone.blocks.0.bias"}


def test_partition_spec_errors_name_the_mismatch():
    tree = _tree()
    with pytest.raises(ValueError, match="1 leaves without a label"):
        pytree.partition(tree, {"backbone.blocks.0.weight": True, "backbone.blocks.0.bias": True, "head.weight": True})
    labels = dict.fromkeys(pytree.flatten(tree), "frozen")
    with pytest.raises(ValueError, match="needs select="):
        pytree.partition(tree, labels)
    with pytest.raises(UsageError, match=r"'trainabel'.*labels of the leaves: frozen"):
        pytree.partition(tree, labels, select="trainabel")


def test_combine_takes_first_non_hole_and_checks_names():
    a = {"x": None, "y": torch.ones(1)}
    b = {"x": torch.zeros(1), "y": torch.full((1,), 5.0)}
    out = pytree.combine(a, b)
    assert out["x"] is b["x"] and out["y"] is a["y"]
    with pytest.raises(ValueError, match="differ in their leaves"):
        pytree.combine(a, {"x": None})


def test_tree_map_keeps_holes_and_stack_unstack_round_trip():
    tree = {"a": torch.ones(2), "b": None}
    doubled = pytree.tree_map(lambda leaf: leaf * 2, tree)
    assert doubled["b"] is None and torch.equal(doubled["a"], torch.full((2,), 2.0))
    stacked = pytree.stack([{"w": torch.zeros(2, 3)}, {"w": torch.ones(2, 3)}])
    assert stacked["w"].shape == (2, 2, 3)
    first, second = pytree.unstack(stacked)
    assert torch.equal(first["w"], torch.zeros(2, 3)) and torch.equal(second["w"], torch.ones(2, 3))


def test_check_labels_lists_both_sets_like_optax():
    labels = {"a": "trainable", "b": "backbone", "c": "frozen"}
    pytree.check_labels(labels, {"trainable": {}, "backbone": {}})
    with pytest.raises(UsageError) as info:
        pytree.check_labels(labels, {"trainable": {}})
    message = str(info.value)
    assert "'backbone'" in message
    assert "labels of the parameters: backbone, frozen, trainable" in message
    assert "labels with settings: frozen, trainable" in message
