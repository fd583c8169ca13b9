"""The model: backbone + adapter + head from registry names, frozen backbones, specs and rebuilds."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import cdft_core
from cdft_core import hookimpl
from cdft_core.errors import CdftError, UsageError
from cdft_core.models.adapters import Cdtm, PooledAdapter
from cdft_core.models.model import CdftModel, build_model, model_from_spec
from cdft_core.registry import get_registry, load_registry


def tiny(backbone: str = "test_vit", adapter: str = "cdtm", **kwargs) -> CdftModel:
    kwargs.setdefault("pretrained", False)
    kwargs.setdefault("image_size", 32)
    if adapter == "cdtm":
        kwargs.setdefault("adapter_options", {"centres": 5})
    torch.manual_seed(0)
    return build_model(backbone, adapter, 3, **kwargs)


@pytest.mark.parametrize("backbone", ["test_vit", "test_convnext"])
@pytest.mark.parametrize("adapter", ["none", "cdtm"])
def test_models_give_logits_and_stable_parameter_names(backbone, adapter):
    model = tiny(backbone, adapter, image_size=64)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    names = [n for n, _ in model.named_parameters()]
    assert all(n.startswith(("backbone.model.", "adapter.", "head.")) for n in names)
    assert {"head.weight", "head.bias"} <= set(names)
    adapter_names = [n for n in names if n.startswith("adapter.")]
    if adapter == "none":
        assert adapter_names == [] and isinstance(model.adapter, PooledAdapter)
    else:
        assert "adapter.blocks.0.mixing" in adapter_names and "adapter.norm_out.weight" in adapter_names
    assert model.head.in_features == 64


def test_cdtm_is_sized_from_the_backbone_tokens():
    vit = tiny("test_vit", image_size=96, adapter_options={"centres": 7, "blocks": 2})
    assert vit.adapter.blocks[0].mixing.shape == (7, 36, 36) and len(vit.adapter.blocks) == 2
    convnext = tiny("test_convnext", image_size=160)
    assert convnext.adapter.blocks[0].mixing.shape == (5, 25, 25)
    assert vit.spec["num_tokens"] == 36 and convnext.spec["num_tokens"] == 25


def test_forward_runs_the_backbone_once_per_batch(monkeypatch):
    model = tiny("test_convnext", "cdtm")
    calls = []
    original = model.backbone.model.forward_features
    monkeypatch.setattr(model.backbone.model, "forward_features", lambda x: calls.append(1) or original(x))
    model(torch.randn(2, 3, 32, 32))
    assert calls == [1]


def test_model_output_is_head_of_adapter_of_backbone_features():
    model = tiny("test_vit", "cdtm").eval()
    x = torch.randn(2, 3, 32, 32)
    tokens, pooled = model.backbone.features(x)
    expected = model.head(model.adapter(tokens, pooled))
    torch.testing.assert_close(model(x), expected)
    none = tiny("test_vit", "none").eval()
    torch.testing.assert_close(none(x), none.head(none.backbone.pooled(x)))


def test_frozen_backbone_runs_without_grad_and_stays_in_eval_mode():
    model = tiny("test_vit", "cdtm")
    model.backbone.model.pos_drop.p = 0.5  # make train mode observable in the backbone
    model.backbone_frozen = True
    model.train()
    assert model.training and model.adapter.training and model.head.training
    assert not model.backbone.training and not any(m.training for m in model.backbone.modules())
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    torch.testing.assert_close(out, model(x))  # no dropout in the backbone
    out.sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.adapter.parameters())
    assert model.head.weight.grad is not None

    model.backbone_frozen = False
    assert model.backbone.training
    model(x).sum().backward()
    assert model.backbone.model.patch_embed.proj.weight.grad is not None
    model.eval()
    model.backbone_frozen = True
    model.backbone_frozen = False
    assert not model.backbone.training  # unfreezing an eval model leaves it in eval


def test_backbone_frozen_defaults_to_false():
    model = tiny("test_convnext", "none")
    assert model.backbone_frozen is False
    model.train()
    assert model.backbone.training


def test_grad_checkpointing_reaches_the_backbone_and_trains():
    model = tiny("test_vit", "cdtm", grad_checkpointing=True, adapter_options={"centres": 5, "checkpoint_blocks": 1})
    assert model.backbone.model.grad_checkpointing is True
    assert model.adapter.checkpoint_blocks == 1 and model.spec["grad_checkpointing"] is True
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.backbone.model.blocks[0].attn.qkv.weight.grad is not None


# -- adapter options and metadata ------------------------------------------------------


def test_adapter_metadata_says_what_it_needs():
    registry = get_registry()
    none, cdtm = registry.get("adapter", "none"), registry.get("adapter", "cdtm")
    assert none.metadata["uses_tokens"] is False and none.metadata["has_parameters"] is False
    assert cdtm.metadata["uses_tokens"] is True and cdtm.metadata["has_parameters"] is True
    assert cdtm.metadata["options"] == {"centres": 300, "blocks": 1, "mlp_ratio": 4.0, "dropout": 0.0, "checkpoint_blocks": 0}


def test_adapter_options_from_strings_are_typed_and_recorded_in_the_spec():
    model = tiny(adapter_options={"centres": "6", "blocks": "2", "mlp_ratio": "2", "dropout": "0.1"})
    block = model.adapter.blocks[0]
    assert block.mixing.shape[0] == 6 and len(model.adapter.blocks) == 2
    assert block.mlp.fc1.out_features == 128 and block.drop.p == pytest.approx(0.1)
    assert model.spec["adapter_options"] == {"centres": 6, "blocks": 2, "mlp_ratio": 2.0, "dropout": 0.1, "checkpoint_blocks": 0}


def test_bad_adapter_options_are_usage_errors():
    with pytest.raises(UsageError, match="has no option temperature; its options: centres=300"):
        tiny(adapter_options={"temperature": 1})
    with pytest.raises(UsageError, match="'centres' must be an integer, got 'many'"):
        tiny(adapter_options={"centres": "many"})
    with pytest.raises(UsageError, match="dropout must be in"):
        tiny(adapter_options={"dropout": "2"})
    with pytest.raises(UsageError, match="adapter 'none' has no option centres"):
        tiny(adapter="none", adapter_options={"centres": 3})


def test_bad_arguments_are_usage_errors():
    with pytest.raises(UsageError, match="num_classes"):
        build_model("test_vit", "none", 0, pretrained=False)
    with pytest.raises(UsageError, match="unknown adapter 'cdtn'.*did you mean 'cdtm'"):
        build_model("test_vit", "cdtn", 2, pretrained=False)


def test_a_third_party_adapter_follows_the_factory_contract():
    seen = {}

    class Gated(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.out_dim = 2 * dim
            self.gate = nn.Parameter(torch.zeros(dim))

        def forward(self, tokens, pooled):
            return torch.cat([tokens.mean(1) * self.gate.sigmoid(), pooled], dim=-1)

    def factory(*, dim, num_tokens, pooled_dim, width=1):
        seen.update(dim=dim, num_tokens=num_tokens, pooled_dim=pooled_dim, width=width)
        return Gated(dim)

    class Plugin:
        @hookimpl
        def register_adapters(self, register):
            register("gated", factory, metadata={"uses_tokens": True, "has_parameters": True, "options": {"width": 1}})

    import cdft_plugins.timm_backbones as timm_plugin

    registry = load_registry(builtins=False, entry_points=False, extra_plugins=[("timm", timm_plugin), ("gated", Plugin())])
    model = build_model("test_convnext", "gated", 4, pretrained=False, image_size=64, adapter_options={"width": "3"}, registry=registry)
    assert seen == {"dim": 64, "num_tokens": 4, "pooled_dim": 64, "width": 3}
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4) and model.head.in_features == 128


def test_an_adapter_without_out_dim_is_reported():
    class Plugin:
        @hookimpl
        def register_adapters(self, register):
            register("broken", lambda **kw: nn.Identity())

    import cdft_plugins.timm_backbones as timm_plugin

    registry = load_registry(builtins=False, entry_points=False, extra_plugins=[("timm", timm_plugin), ("b", Plugin())])
    with pytest.raises(CdftError, match="adapter 'broken'.*out_dim"):
        build_model("test_vit", "broken", 2, pretrained=False, registry=registry)


class _Sized(nn.Module):
    """An adapter that declares ``out_dim`` and returns ``width`` features per image."""

    def __init__(self, out_dim, width):
        super().__init__()
        self.out_dim, self.width = out_dim, width
        self.drop = nn.Dropout(0.5)

    def forward(self, tokens, pooled):
        assert not self.training  # checked in eval mode: no dropout draw, no state change
        return self.drop(pooled[:, : self.width])


def test_an_adapter_whose_output_differs_from_its_out_dim_is_refused_at_build():
    """Caught when the model is built (before any run directory), naming the adapter and its
    plugin, instead of a bare matrix-size error in the first training step."""
    class Plugin:
        @hookimpl
        def register_adapters(self, register):
            register("wrongdim", lambda **kw: _Sized(out_dim=19, width=16))
            register("rightdim", lambda **kw: _Sized(out_dim=16, width=16))
            register("crashes", lambda **kw: (_ for _ in ()).throw(ValueError("oops, plugin bug")))

        @hookimpl
        def register_backbones(self, register):
            register("crashnet", lambda **kw: (_ for _ in ()).throw(ValueError("no weights for you")))

    import cdft_plugins.timm_backbones as timm_plugin

    registry = load_registry(builtins=False, entry_points=False, extra_plugins=[("timm", timm_plugin), ("h3", Plugin())])
    with pytest.raises(CdftError, match=r"^adapter 'wrongdim' \(plugin 'h3'\) declares out_dim 19 but returns features "
                                        r"of shape \(16,\) per image; make out_dim the size of its output$"):
        build_model("test_vit", "wrongdim", 2, pretrained=False, image_size=32, registry=registry)
    model = build_model("test_vit", "rightdim", 2, pretrained=False, image_size=32, registry=registry)
    assert model.adapter.training and model.head.in_features == 16
    with pytest.raises(CdftError, match=r"^adapter 'crashes' \(plugin 'h3'\) failed to build: ValueError: oops, plugin bug$"):
        build_model("test_vit", "crashes", 2, pretrained=False, image_size=32, registry=registry)
    with pytest.raises(CdftError, match=r"^backbone 'crashnet' \(plugin 'h3'\) failed to build: ValueError: no weights"):
        build_model("crashnet", "rightdim", 2, pretrained=False, registry=registry)


# -- spec and rebuild -------------------------------------------------------------------


def test_spec_is_json_and_rebuilds_the_same_architecture_without_download(monkeypatch, tmp_path):
    model = tiny("test_vit", "cdtm", image_size=48, adapter_options={"centres": 4, "blocks": 2}).eval()
    spec = json.loads(json.dumps(model.spec))
    assert spec["backbone"] == "test_vit.r160_in1k" and spec["adapter"] == "cdtm" and spec["num_classes"] == 3
    assert spec["image_size"] == 48 and spec["data_config"]["input_size"] == [3, 48, 48]

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # nothing cached: any download attempt would fail
    rebuilt = model_from_spec(spec).eval()
    rebuilt.load_state_dict(model.state_dict())  # strict: same names and shapes
    x = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(rebuilt(x), model(x))
    assert rebuilt.data_config == model.data_config
    assert rebuilt.spec == spec


def test_rebuild_keeps_the_saved_data_config_and_weight_source():
    model = tiny("test_convnext", "none")
    spec = json.loads(json.dumps(model.spec))
    spec["data_config"]["mean"] = [0.1, 0.2, 0.3]
    spec["data_config"]["source"] = "saved with the checkpoint"
    spec["weights"] = "hub:timm/test_convnext.r160_in1k"
    rebuilt = model_from_spec(spec)
    assert rebuilt.data_config["mean"] == (0.1, 0.2, 0.3) and rebuilt.data_config["input_size"] == (3, 32, 32)
    assert rebuilt.data_config["source"] == "saved with the checkpoint"
    assert rebuilt.backbone.data_config == rebuilt.data_config
    assert rebuilt.spec["weights"] == "hub:timm/test_convnext.r160_in1k"


def test_bad_specs_are_clear_errors():
    spec = dict(tiny("test_vit", "none").spec)
    with pytest.raises(CdftError, match="lacks adapter"):
        model_from_spec({k: v for k, v in spec.items() if k != "adapter"})
    with pytest.raises(CdftError, match="format 99 is newer"):
        model_from_spec(dict(spec, format=99))
    with pytest.raises(CdftError, match="num_tokens=4 but the checkpoint was built with 5"):
        model_from_spec(dict(spec, num_tokens=5))


def test_cdtm_module_is_the_registered_adapter():
    assert isinstance(tiny().adapter, Cdtm)


def test_a_checkpoint_whose_plugin_is_missing_names_the_package_to_install():
    """A run records the plugin and package of each component; where that plugin is not
    installed, the unknown-name error says what to install instead of pointing elsewhere."""
    from cdft_core.inference.model_loading import model_from_tensors

    assert get_registry().provenance("backbone", "test_vit") == {
        "name": "test_vit.r160_in1k", "plugin": "timm", "distribution": "cdft", "version": cdft_core.__version__}
    spec = dict(build_model("test_vit", "none", 2, pretrained=False, image_size=32).spec, backbone="tinynet")
    plugins = {"backbone": {"name": "tinynet", "plugin": "h3", "distribution": "cdft-h3", "version": "0.1.0"}}
    with pytest.raises(UsageError, match=r"^unknown backbone 'tinynet'.*; the checkpoint was made with backbone 'tinynet' "
                                         r"of plugin 'h3' \(cdft-h3 0.1.0\): install that package here "
                                         r"\(pip install cdft-h3\)$"):
        model_from_tensors({}, {"cdft_spec": spec, "cdft_plugins": plugins}, "best.safetensors")
    with pytest.raises(UsageError) as caught:  # a checkpoint from before the record: the plain error
        model_from_tensors({}, {"cdft_spec": spec}, "best.safetensors")
    assert "the checkpoint was made with" not in str(caught.value)
