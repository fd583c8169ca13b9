"""Curated pathology foundation models: built offline on the meta device with their cards' arguments."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from cdft_core.errors import CdftError
from cdft_core.models.foundation import build_foundation_backbone

#: name -> (token width, pooled width, prefix tokens, patch tokens at 224 px)
EXPECTED = {
    "uni": (1024, 1024, 1, 196),
    "uni2-h": (1536, 1536, 9, 256),
    "virchow2": (1280, 2560, 5, 256),
    "h-optimus-0": (1536, 1536, 5, 256),
    "h-optimus-1": (1536, 1536, 5, 256),
    "prov-gigapath": (1536, 1536, 1, 196),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_row_builds_on_meta_with_its_width_and_token_count(name):
    bb = build_foundation_backbone(name, pretrained=False, device="meta")
    dim, pooled_dim, prefix, tokens = EXPECTED[name]
    assert (bb.dim, bb.pooled_dim, bb.num_prefix_tokens) == (dim, pooled_dim, prefix)
    assert bb.num_tokens(224) == tokens  # class and register tokens excluded
    assert bb.data_config["input_size"] == (3, 224, 224)
    assert "huggingface.co" in bb.data_config["source"]


def test_h_optimus_uses_its_own_normalisation():
    bb = build_foundation_backbone("h-optimus-0", pretrained=False, device="meta")
    assert bb.data_config["mean"] == (0.707223, 0.578729, 0.703617)


def test_virchow2_pools_class_token_and_mean_patch_token():
    bb = build_foundation_backbone("virchow2", pretrained=False, device="meta")
    tokens, pooled = bb.features(torch.empty(2, 3, 224, 224, device="meta"))
    assert tuple(tokens.shape) == (2, 256, 1280) and tuple(pooled.shape) == (2, 2560)


def test_gated_row_offline_names_hf_token(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CdftError, match=r"MahmoodLab/UNI is gated.*HF_TOKEN"):
        build_foundation_backbone("uni", device="meta")


def test_file_without_layer_scale_is_refused_for_uni(tmp_path):
    import timm

    plain = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0, depth=1)
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(path))
    with pytest.raises(CdftError, match=r"miss \d+ of \d+ tensors of backbone 'uni'|ls1\.gamma.*init_values"):
        build_foundation_backbone("uni", weights=str(path), device="meta")


def test_cdft_list_backbones_shows_the_rows():
    out = subprocess.run([sys.executable, "-m", "cdft_cli", "list", "backbones"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    for name in EXPECTED:
        assert name in out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preflight_measures_the_rows_on_the_meta_device(name):
    """The pre-run checks build every backbone under torch.device("meta"): a row must not
    override that with the CPU (UNI then took ~2 GB and 25 s, and its cost went unmeasured)."""
    from cdft_core.training.preflight import _build_meta, input_cost

    assert all(p.is_meta for p in _build_meta(name, 224).parameters())
    cost = input_cost(name, 224)
    assert cost is not None and (cost.tokens, cost.width) == (EXPECTED[name][3], EXPECTED[name][0])


def test_an_image_size_below_a_row_s_patch_names_a_size_that_works():
    from cdft_core.errors import UsageError
    from cdft_core.training.preflight import input_cost

    with pytest.raises(UsageError, match=r"^--image-size 8 is smaller than one patch of backbone 'uni' "
                                         r"\(patch 16 px\); use --image-size 16 or more$"):
        input_cost("uni", 8)
