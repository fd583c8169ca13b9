"""CDTM: equal to a naive implementation of docs/method.md#cdtm (expanded B×K×N×N sum), outputs and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cdft_core.errors import CdftError
from cdft_core.models.adapters import Cdtm


def naive_cdtm(params: dict[str, torch.Tensor], x: torch.Tensor, blocks: int) -> torch.Tensor:
    """docs/method.md#cdtm written out literally, with the reference's expanded B×K×N×N tensor."""

    def ln(t, prefix):
        return F.layer_norm(t, t.shape[-1:], params[prefix + ".weight"], params[prefix + ".bias"], 1e-5)

    def linear(t, prefix):
        return t @ params[prefix + ".weight"].T + params[prefix + ".bias"]

    x = ln(x, "norm_in")
    for i in range(blocks):
        p = f"blocks.{i}"
        y = ln(x, p + ".norm1")
        q = y.mean(dim=1)
        centres = params[p + ".centres"]  # C×K
        cos = (q / q.norm(dim=-1, keepdim=True)) @ (centres / centres.norm(dim=0, keepdim=True))
        a = torch.exp(cos) / torch.exp(cos).sum(dim=-1, keepdim=True)  # softmax over k
        T = params[p + ".mixing"]  # K×N×N
        expanded = a[:, :, None, None] * T[None]  # B×K×N×N
        m = expanded.sum(dim=1)
        z = linear(torch.einsum("bij,bjc->bic", m, y), p + ".proj")
        h = linear(ln(z, p + ".norm2"), p + ".mlp.fc1")
        h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))  # exact GELU
        x = z + linear(h, p + ".mlp.fc2")
    return ln(x, "norm_out").mean(dim=1)


@pytest.mark.parametrize(
    "B,N,C,K,L",
    [(1, 4, 8, 3, 1), (2, 9, 16, 5, 2), (3, 16, 24, 7, 1), (4, 25, 12, 300, 3), (2, 49, 32, 11, 2)],
)
def test_cdtm_matches_naive_outputs_and_gradients(B, N, C, K, L):
    torch.manual_seed(B * 1000 + N)
    module = Cdtm(C, N, centres=K, blocks=L, mlp_ratio=2.5).double()
    # Non-default LayerNorm/bias values so every parameter influences the comparison.
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith((".weight", ".bias")) and p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(B, N, C, dtype=torch.float64)
    x_ref = x.clone().requires_grad_(True)
    x.requires_grad_(True)
    ref_params = {n: p.detach().clone().requires_grad_(True) for n, p in module.named_parameters()}

    out = module(x)
    ref = naive_cdtm(ref_params, x_ref, L)
    assert out.shape == (B, C)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    weight = torch.randn(B, C, dtype=torch.float64)
    (out * weight).sum().backward()
    (ref * weight).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    for name, p in module.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref_params[name].grad, atol=1e-5, rtol=1e-5, msg=name)


def test_cdtm_float32_matches_naive():
    torch.manual_seed(0)
    module = Cdtm(16, 10, centres=6, blocks=2)
    x = torch.randn(3, 10, 16)
    params = {n: p.detach() for n, p in module.named_parameters()}
    torch.testing.assert_close(module(x), naive_cdtm(params, x, 2), atol=1e-5, rtol=1e-5)


def test_cdtm_defaults_and_parameter_names():
    module = Cdtm(8, 5)
    assert module.out_dim == 8
    assert len(module.blocks) == 1
    block = module.blocks[0]
    assert block.centres.shape == (8, 300)
    assert block.mixing.shape == (300, 5, 5)
    assert block.mlp.fc1.out_features == 32  # r = 4
    names = {n for n, _ in module.named_parameters()}
    assert {"norm_in.weight", "blocks.0.centres", "blocks.0.mixing", "blocks.0.proj.weight",
            "blocks.0.mlp.fc2.bias", "norm_out.bias"} <= names


def test_cdtm_vit_b_parameter_count():
    """docs/method.md#cdtm: ≈17 M parameters at ViT-B (C=768, N=196), of which T is 300·196·196."""
    module = Cdtm(768, 196)
    total = sum(p.numel() for p in module.parameters())
    assert module.blocks[0].mixing.numel() == 300 * 196 * 196
    assert 16.5e6 < total < 17.5e6


def test_cdtm_never_materialises_the_expanded_tensor():
    """No intermediate of the forward or backward pass has B·K·N·N elements."""
    from torch.utils._python_dispatch import TorchDispatchMode

    B, N, C, K = 2, 12, 8, 50
    sizes = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    sizes.append(t.numel())
            return out

    module = Cdtm(C, N, centres=K)
    x = torch.randn(B, N, C, requires_grad=True)
    with Sizes():
        module(x).sum().backward()
    assert sizes and max(sizes) < B * K * N * N
    assert max(sizes) >= K * N * N  # the mixing matrices' gradient itself is seen


def test_cdtm_dropout_and_checkpointing():
    torch.manual_seed(1)
    plain = Cdtm(8, 6, centres=4, blocks=2)
    ckpt = Cdtm(8, 6, centres=4, blocks=2, checkpoint_blocks=2)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 6, 8)
    plain.train()
    ckpt.train()
    plain(x).sum().backward()
    ckpt(x).sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)

    dropped = Cdtm(8, 6, centres=4, dropout=0.5)
    dropped.train()
    assert not torch.equal(dropped(x), dropped(x))
    dropped.eval()
    torch.testing.assert_close(dropped(x), dropped(x))


def test_cdtm_rejects_wrong_token_count_and_bad_options():
    module = Cdtm(8, 6, centres=4)
    with pytest.raises(CdftError, match="built for 6 tokens but received 7"):
        module(torch.randn(1, 7, 8))
    with pytest.raises(CdftError, match="centres"):
        Cdtm(8, 6, centres=0)
    with pytest.raises(CdftError, match="dropout"):
        Cdtm(8, 6, dropout=1.5)
    with pytest.raises(CdftError, match="checkpoint_blocks"):
        Cdtm(8, 6, blocks=1, checkpoint_blocks=2)


@pytest.mark.parametrize(("option", "value", "message"), [
    ("centres", 10**9, "centres must be an integer from 1 to 100,000"),
    ("blocks", 10**6, "blocks must be an integer from 1 to 64"),
    ("mlp_ratio", 1e7, r"mlp_ratio must be in \(0, 64\]"),
])
def test_cdtm_options_past_any_sensible_size_are_refused_before_allocating(option, value, message):
    """A crafted checkpoint spec (or a typo) with centres 1e9 tried to allocate 256 GB."""
    with pytest.raises(CdftError, match=message):
        Cdtm(8, 6, **{option: value})
