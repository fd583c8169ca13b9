"""The open_clip row: ConvNeXt-B LAION-400M's timm trunk, and the plugin's unavailable state."""

from __future__ import annotations

import sys

import pytest
import torch

from cdft_core.errors import UsageError
from cdft_core.registry import get_registry, load_registry

ROW = "open_clip:convnext_base.laion400m_s13b_b51k"
SEED_SPELLING = "convnext_base laion400m_s13b_b51k"


@pytest.fixture(scope="module")
def model():
    pytest.importorskip("open_clip")
    from cdft_core.models.model import build_model
    from cdft_core.registry import reset_registry

    reset_registry()
    torch.manual_seed(0)
    built = build_model(SEED_SPELLING, "none", 2, pretrained=False)
    reset_registry()
    return built.eval()


@pytest.fixture(scope="module")
def trunk(model):
    return model.backbone


def test_row_builds_the_timm_convnext_trunk_with_random_weights(trunk):
    import open_clip
    import timm

    assert isinstance(trunk.model, timm.models.ConvNeXt)
    assert trunk.family == "convnext" and trunk.dim == 1024 and trunk.name == ROW
    assert trunk.weights == "random init"
    with torch.no_grad():
        tokens, pooled = trunk.features(torch.randn(1, 3, 224, 224))
    assert tokens.shape == (1, 49, 1024) and pooled.shape == (1, 1024)
    assert trunk.num_tokens(224) == 49 and trunk.num_tokens(160) == 25
    assert trunk.data_config["mean"] == tuple(open_clip.OPENAI_DATASET_MEAN)
    assert trunk.data_config["std"] == tuple(open_clip.OPENAI_DATASET_STD)
    assert trunk.data_config["input_size"] == (3, 224, 224)
    assert "open_clip pretrained cfg convnext_base/laion400m_s13b_b51k" in trunk.data_config["source"]
    # The projection to the text space is gone: cdft's head replaces it.
    assert isinstance(trunk.model.head.fc, torch.nn.Identity)


def test_both_spellings_resolve_to_the_canonical_row():
    pytest.importorskip("open_clip")
    registry = get_registry()
    exact = registry.get("backbone", ROW)
    seed = registry.get("backbone", SEED_SPELLING)
    assert exact.name == seed.name == ROW
    assert exact.provider == seed.provider == "open_clip"
    assert exact.metadata["family"] == "convnext" and "LAION-400M" in exact.metadata["pretraining"]
    assert exact.metadata["data_config"]["mean"] == (0.48145466, 0.4578275, 0.40821073)


def test_unknown_open_clip_names_are_usage_errors():
    pytest.importorskip("open_clip")
    with pytest.raises(UsageError, match="no pretrained model 'convnext_base' with tag 'nope'"):
        get_registry().get("backbone", "open_clip:convnext_base.nope")
    with pytest.raises(UsageError, match="has no timm trunk"):
        get_registry().get("backbone", "open_clip:ViT-B-32.openai")


def test_catalogue_lists_open_clip_pairs_with_a_timm_trunk():
    pytest.importorskip("open_clip")
    names = [c.name for c in get_registry().list("backbone", "open_clip:*")]
    assert ROW in names and all(n.startswith("open_clip:") for n in names)


def test_model_spec_names_the_canonical_row_and_open_clip_preprocessing(model):
    assert model.spec["backbone"] == ROW
    assert model.spec["data_config"]["mean"] == [0.48145466, 0.4578275, 0.40821073]
    assert model.spec["num_tokens"] == 49 and model.spec["dim"] == 1024
    assert {n.split(".")[1] for n, _ in model.named_parameters() if n.startswith("backbone.")} == {"model"}
    with torch.no_grad():
        assert model(torch.randn(1, 3, 160, 160)).shape == (1, 2)


def test_plugin_is_unavailable_without_open_clip(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip now fails; find_spec says absent
    registry = load_registry()
    info = registry.plugin("open_clip")
    assert info.status == "unavailable"
    assert "pip install 'cdft[open_clip]'" in info.error
    assert all(p.name != "open_clip" for p in registry.problems())  # unavailable, not broken
    with pytest.raises(UsageError, match=r"unknown backbone.*plugin 'open_clip' is unavailable.*cdft\[open_clip\]"):
        registry.get("backbone", ROW)
    assert registry.get("backbone", "convnext_base.fb_in22k").provider == "timm"
