"""JAX interop through DLPack: names, nesting, shapes, dtypes and values survive a round trip."""

from __future__ import annotations

import pytest
import torch
from helpers_strategy import tiny_model

from cdft_core.errors import CdftError, UsageError
from cdft_core.functional import pytree
from cdft_core.functional.jax_interop import from_jax, to_jax


@pytest.fixture
def jax():
    return pytest.importorskip("jax")


def test_without_jax_the_error_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "jax", None)  # makes `import jax` fail
    with pytest.raises(CdftError, match=r"pip install 'cdft\[jax\]'"):
        to_jax({"w": torch.ones(1)})


def _mixed_tree():
    generator = torch.Generator().manual_seed(0)
    return {
        "layer": {
            "weight": torch.randn(4, 3, generator=generator),
            "half": torch.randn(5, generator=generator).half(),
            "bf16": torch.randn(2, 2, generator=generator).to(torch.bfloat16),
            "scalar": torch.tensor(1.5),
        },
        "counts": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "mask": torch.tensor([True, False, True]),
        "hole": None,
    }


def test_round_trip_preserves_names_shapes_dtypes_and_values(jax):
    tree = _mixed_tree()
    arrays = to_jax(tree)
    assert pytree.flatten(arrays).keys() == pytree.flatten(tree).keys()
    assert arrays["hole"] is None
    assert isinstance(arrays["layer"]["weight"], jax.Array)
    assert str(arrays["layer"]["bf16"].dtype) == "bfloat16"
    assert str(arrays["layer"]["half"].dtype) == "float16"
    assert arrays["counts"].shape == (2, 3) and str(arrays["counts"].dtype) == "int32"
    assert float(arrays["layer"]["scalar"]) == 1.5

    back = pytree.flatten(from_jax(arrays))
    for name, original in pytree.flatten(tree).items():
        if original is None:
            assert back[name] is None
            continue
        assert back[name].dtype == original.dtype, name
        assert back[name].shape == original.shape, name
        assert torch.equal(back[name], original), name


def test_cpu_transfer_is_zero_copy_and_copy_true_is_not(jax):
    tensor = torch.randn(8, 8)
    shared = to_jax({"w": tensor})["w"]
    assert shared.unsafe_buffer_pointer() == tensor.data_ptr()
    assert from_jax({"w": shared})["w"].data_ptr() == tensor.data_ptr()
    copied = to_jax({"w": tensor}, copy=True)["w"]
    assert copied.unsafe_buffer_pointer() != tensor.data_ptr()


def test_model_parameters_cross_over_and_compute_the_same_thing(jax):
    model = tiny_model("test_vit")
    params = pytree.parameters(model)  # nested, detached
    arrays = to_jax(params)
    assert set(arrays) == {name.split(".")[0] for name, _ in model.named_parameters()} >= {"backbone", "head"}
    features = torch.randn(2, model.head.in_features)
    head = arrays["head"]
    jax_logits = jax.numpy.asarray(features.numpy()) @ head["weight"].T + head["bias"]
    assert torch.allclose(torch.from_dlpack(jax_logits), model.head(features).detach(), atol=1e-5)


def test_non_contiguous_and_grad_tensors_are_handled(jax):
    weight = torch.randn(3, 4, requires_grad=True)
    arrays = to_jax({"t": weight.detach().t(), "p": weight})
    assert arrays["t"].shape == (4, 3)
    assert torch.equal(from_jax(arrays)["t"], weight.detach().t())


def test_64_bit_leaves_need_jax_x64_mode(jax):
    with pytest.raises(UsageError, match="jax_enable_x64"):
        to_jax({"steps": torch.tensor([1, 2], dtype=torch.int64)})
    with jax.enable_x64(True):
        arrays = to_jax({"steps": torch.tensor([1, 2], dtype=torch.int64), "w": torch.ones(2, dtype=torch.float64)})
        back = from_jax(arrays)
    assert back["steps"].dtype == torch.int64 and back["w"].dtype == torch.float64
