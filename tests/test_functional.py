"""The torch.func core: functional apply equals the module; functional grads equal backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers_strategy import tiny_batch, tiny_model

from cdft_core.functional import apply as functional
from cdft_core.functional import pytree


def test_apply_with_the_models_own_tree_equals_calling_it():
    model = tiny_model("test_vit").eval()
    x, _ = tiny_batch()
    params, buffers = pytree.parameters(model), pytree.buffers(model)
    with torch.no_grad():
        assert torch.allclose(functional.apply(model, params, buffers, x), model(x))


def test_apply_uses_the_given_weights_not_the_modules():
    model = tiny_model("test_vit").eval()
    x, _ = tiny_batch()
    params = pytree.flatten(pytree.parameters(model))
    params["head.bias"] = params["head.bias"] + 100.0
    with torch.no_grad():
        shifted = functional.apply(model, params, None, x)
        assert torch.allclose(shifted, model(x) + 100.0, atol=1e-4)
    assert model.head.bias.abs().max() < 100  # the module itself is untouched


def test_apply_refuses_holes():
    model = tiny_model("test_vit")
    trainable, _frozen = functional.split(model, None)
    trainable["head.bias"] = None
    with pytest.raises(ValueError, match="holes"):
        functional.apply(model, trainable, None, tiny_batch()[0])


@pytest.mark.parametrize(
    ("backbone", "adapter", "prefixes"),
    [("test_vit", "cdtm", ("adapter.", "head.")), ("test_convnext", "none", ("",))],
    ids=["vit-frt", "convnext-full"],
)
def test_functional_grads_equal_module_backward(backbone, adapter, prefixes):
    model = tiny_model(backbone, adapter).eval()
    x, y = tiny_batch()
    labels = {n: ("trainable" if n.startswith(prefixes) else "frozen") for n, _ in model.named_parameters()}

    trainable, frozen = functional.split(model, labels)
    grads, loss = functional.grad_and_value(functional.make_loss_fn(model))(trainable, frozen, (x, y))

    for name, param in model.named_parameters():
        param.requires_grad_(labels[name] == "trainable")
    reference = F.cross_entropy(model(x), y)
    reference.backward()

    assert torch.allclose(loss, reference)
    grads = pytree.flatten(grads)
    assert grads.keys() == labels.keys()
    for name, param in model.named_parameters():
        if labels[name] == "frozen":
            assert grads[name] is None and param.grad is None  # no gradient work, either way
        else:
            assert torch.allclose(grads[name], param.grad, atol=1e-6, rtol=1e-4), name
    assert sum(g is not None for g in grads.values()) > 0


def test_split_follows_requires_grad_without_labels():
    model = tiny_model("test_vit")
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    trainable, frozen = functional.split(model)
    assert {n.split(".")[0] for n in pytree.compact(trainable)} == {"head"}
    assert all(not leaf.requires_grad for leaf in pytree.compact(frozen).values())
    assert {n.split(".")[0] for n in pytree.compact(frozen)} == {"backbone"}
