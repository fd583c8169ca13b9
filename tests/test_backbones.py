"""Backbones: the token interface on timm ViTs and ConvNeXts, paper rows, the timm resolver."""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

from cdft_core.errors import UsageError
from cdft_core.registry import get_registry

PAPER_TIMM_ROWS = {
    "vit_base_patch16_clip_224.laion2b": ("vit", "LAION-2B"),
    "vit_base_patch16_clip_224.openai": ("vit", "OpenAI CLIP"),
    "vit_base_patch16_224.augreg_in21k": ("vit", "ImageNet-21k"),
    "convnext_base.clip_laion2b_augreg": ("convnext", "LAION-2B"),
    "convnext_base.fb_in22k": ("convnext", "ImageNet-22k"),
}


def build(name: str, image_size: int | None = None, **kwargs):
    return get_registry().get("backbone", name).factory(pretrained=False, image_size=image_size, **kwargs)


@pytest.fixture(scope="module")
def vit_b_224():
    torch.manual_seed(0)
    return build("vit_base_patch16_clip_224.laion2b", 224).eval()


@pytest.fixture(scope="module")
def convnext_b():
    torch.manual_seed(0)
    return build("convnext_base.clip_laion2b_augreg", 224).eval()


# -- the small test models: exact token / pooled semantics ----------------------------


@pytest.mark.parametrize("size", [32, 64, 96])
def test_test_vit_tokens_drop_the_class_token_and_pooled_is_the_class_token(size):
    bb = build("test_vit", size).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = bb.model.forward_features(x)
        tokens, pooled = bb.features(x)
    n = (size // 16) ** 2
    assert bb.family == "vit" and bb.dim == 64 and bb.num_prefix_tokens == 1
    assert tokens.shape == (2, n, 64) and pooled.shape == (2, 64)
    assert bb.num_tokens() == n == bb.num_tokens(size)
    torch.testing.assert_close(tokens, feats[:, 1:])
    torch.testing.assert_close(pooled, feats[:, 0])
    torch.testing.assert_close(bb.tokens(x), tokens)
    torch.testing.assert_close(bb.pooled(x), pooled)
    assert bb.data_config["input_size"] == (3, size, size)


@pytest.mark.parametrize("size", [32, 64, 100])
def test_test_convnext_tokens_are_the_flattened_map_and_pooled_its_normalised_mean(size):
    bb = build("test_convnext", size).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        fmap = bb.model.forward_features(x)
        tokens, pooled = bb.features(x)
    h, w = fmap.shape[-2:]
    assert bb.family == "convnext" and bb.dim == 64
    assert tokens.shape == (2, h * w, 64) and pooled.shape == (2, 64)
    assert bb.num_tokens(size) == h * w == (size // 32) ** 2
    torch.testing.assert_close(tokens, fmap.flatten(2).transpose(1, 2))
    norm = bb.model.head.norm
    expected = F.layer_norm(tokens.mean(dim=1), (64,), norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(pooled, expected)


def test_features_run_the_backbone_once(monkeypatch):
    bb = build("test_vit", 32)
    calls = []
    original = bb.model.forward_features
    monkeypatch.setattr(bb.model, "forward_features", lambda x: calls.append(1) or original(x))
    bb.features(torch.randn(1, 3, 32, 32))
    assert calls == [1]


def test_num_tokens_at_other_sizes_is_derived_not_built_in():
    bb = build("test_convnext", 64)
    assert [bb.num_tokens(s) for s in (64, 96, 160, 250)] == [4, 9, 25, 49]
    vit = build("vit_small_patch16_224", 96)
    assert vit.num_tokens() == 36 and vit.dim == 384


def test_grad_checkpointing_is_passed_to_the_timm_model():
    bb = build("test_vit", 32, grad_checkpointing=True)
    assert bb.model.grad_checkpointing is True
    bb.train()
    tokens, pooled = bb.features(torch.randn(2, 3, 32, 32))
    (tokens.sum() + pooled.sum()).backward()
    assert bb.model.patch_embed.proj.weight.grad is not None


# -- ViT-B and ConvNeXt-B, randomly initialised ---------------------------------------


def test_vit_b_clip_shapes_at_224(vit_b_224):
    with torch.no_grad():
        tokens, pooled = vit_b_224.features(torch.randn(1, 3, 224, 224))
    assert tokens.shape == (1, 196, 768) and pooled.shape == (1, 768)
    assert vit_b_224.num_tokens() == 196


def test_vit_b_clip_shapes_at_a_non_default_size():
    bb = build("vit_base_patch16_clip_224.laion2b", 256).eval()
    with torch.no_grad():
        tokens, pooled = bb.features(torch.randn(1, 3, 256, 256))
    assert tokens.shape == (1, 256, 768) and pooled.shape == (1, 768)
    assert bb.num_tokens() == 256
    assert bb.data_config["input_size"] == (3, 256, 256)


@pytest.mark.parametrize("size,n", [(224, 49), (160, 25)])
def test_convnext_b_shapes(convnext_b, size, n):
    with torch.no_grad():
        tokens, pooled = convnext_b.features(torch.randn(1, 3, size, size))
    assert tokens.shape == (1, n, 1024) and pooled.shape == (1, 1024)
    assert convnext_b.num_tokens(size) == n


# -- paper rows, metadata, data configs -------------------------------------------------


def test_paper_rows_are_registered_with_family_pretraining_and_timm_data_config():
    registry = get_registry()
    for name, (family, pretraining) in PAPER_TIMM_ROWS.items():
        component = registry.get("backbone", name)
        assert component.provider == "timm"
        assert component.metadata["family"] == family
        assert pretraining in component.metadata["pretraining"]
        cfg = timm.models.get_pretrained_cfg(name)
        config = component.metadata["data_config"]
        assert config["mean"] == tuple(cfg.mean) and config["std"] == tuple(cfg.std)
        assert config["input_size"] == tuple(cfg.input_size)
        assert config["interpolation"] == cfg.interpolation
        assert name in config["source"]


def test_imagenet21k_vit_keeps_its_own_normalisation_not_clip_constants():
    config = get_registry().get("backbone", "vit_base_patch16_224.augreg_in21k").metadata["data_config"]
    assert config["mean"] == (0.5, 0.5, 0.5) and config["std"] == (0.5, 0.5, 0.5)


def test_backbone_data_config_follows_the_image_size():
    bb = build("test_convnext", 48)
    assert bb.data_config["input_size"] == (3, 48, 48)
    assert bb.data_config["mean"] == (0.5, 0.5, 0.5)
    assert "test_convnext.r160_in1k" in bb.data_config["source"]


def test_registering_the_model_plugins_imports_neither_torch_nor_timm():
    code = (
        "import sys, cdft_plugins.timm_backbones as t, cdft_plugins.adapters as a, cdft_plugins.open_clip_backbones as o\n"
        "from cdft_core.registry import load_registry\n"
        "r = load_registry(builtins=False, entry_points=False, extra_plugins=[('timm', t), ('adapters', a), ('oc', o)])\n"
        "names = [c.name for c in r.list('backbone')]\n"
        "assert 'vit_base_patch16_clip_224.laion2b' in names, names\n"
        "heavy = [m for m in ('torch', 'timm', 'open_clip') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- the timm resolver -----------------------------------------------------------------


def test_any_timm_name_resolves_and_a_bare_name_gets_its_default_tag():
    registry = get_registry()
    component = registry.get("backbone", "convnext_small")
    default_tag = timm.models.get_pretrained_cfg("convnext_small").tag
    assert component.name == f"convnext_small.{default_tag}"
    assert component.metadata["family"] == "convnext"
    assert registry.get("backbone", "deit_tiny_patch16_224.fb_in1k").metadata["family"] == "vit"
    assert registry.get("backbone", "vit_small_patch16_224.augreg_in21k").metadata["family"] == "vit"
    assert registry.get("backbone", "resnet18.a1_in1k").metadata["family"] == "resnet"


def test_resolver_rejects_a_tag_the_architecture_does_not_have():
    with pytest.raises(UsageError, match="no pretrained tag 'nonsense'.*fb_in22k"):
        get_registry().get("backbone", "convnext_base.nonsense")


def test_unknown_backbone_is_a_usage_error_with_suggestions():
    with pytest.raises(UsageError, match="unknown backbone 'vit_base_patch16_clip_224_laion2b'.*did you mean"):
        get_registry().get("backbone", "vit_base_patch16_clip_224_laion2b")
    with pytest.raises(UsageError, match="no pretrained tag 'laion2'; tags: .*laion2b"):
        get_registry().get("backbone", "vit_base_patch16_clip_224.laion2")


def test_catalogue_lists_timm_pretrained_names_for_all_and_patterns():
    registry = get_registry()
    curated = [c.name for c in registry.list("backbone")]
    assert "convnext_base.fb_in22k" in curated and "convnext_small.fb_in22k" not in curated
    everything = [c.name for c in registry.list("backbone", include_all=True)]
    assert len(everything) >= len(timm.list_models(pretrained=True))
    matching = [c.name for c in registry.list("backbone", "vit_base_patch16_clip_224.*")]
    assert "vit_base_patch16_clip_224.laion2b" in matching and "vit_base_patch16_clip_224.openai" in matching
    assert all(n.startswith("vit_base_patch16_clip_224.") for n in matching)


def test_cli_lists_backbones_with_a_pattern():
    from click.testing import CliRunner

    from cdft_cli.main import cli

    result = CliRunner().invoke(cli, ["list", "backbones", "convnext_base.*"])
    assert result.exit_code == 0, result.output
    assert "convnext_base.fb_in22k" in result.output and "convnext_base.clip_laion2b_augreg" in result.output
