"""Weights: files (safetensors, torch state dicts), the Hugging Face cache, clear failures offline."""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from safetensors.torch import save_file

from cdft_core.errors import CdftError, UsageError
from cdft_core.models.weights import hf_cache_dir, read_state_dict
from cdft_core.registry import get_registry

VIT = "test_vit.r160_in1k"


def build(name: str, **kwargs):
    kwargs.setdefault("pretrained", False)
    return get_registry().get("backbone", name).factory(**kwargs)


def reference_state(name: str = "test_vit", seed: int = 7, **kwargs) -> dict[str, torch.Tensor]:
    """A random-init timm state dict, as a hub file of that architecture would hold."""
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in build(name, **kwargs).model.state_dict().items()}


def assert_same_tensors(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    assert set(own) == set(state)
    for key, value in state.items():
        assert torch.equal(own[key], value), key


def fill_hub_cache(cache: str, repo_id: str, filename: str, state: dict[str, torch.Tensor]) -> None:
    """The on-disk layout huggingface_hub uses: refs/main names a snapshot folder."""
    from pathlib import Path

    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file(state, str(snapshot / filename))


# -- files -------------------------------------------------------------------------


def test_safetensors_file_reproduces_its_tensors(tmp_path):
    state = reference_state()
    path = tmp_path / "vit.safetensors"
    save_file(state, str(path))
    bb = build("test_vit", weights=str(path))
    assert_same_tensors(bb.model, state)
    assert bb.weights == f"file:{path}"
    assert bb.load_report.loaded == len(state) and not bb.load_report.missing


def test_bare_file_says_which_data_config_was_assumed(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(reference_state(), str(path))
    config = build("test_vit", weights=str(path)).data_config
    assert config["mean"] == (0.5, 0.5, 0.5) and config["input_size"] == (3, 160, 160)
    assert VIT in config["source"] and "assumed" in config["source"] and str(path) in config["source"]


def test_torch_state_dict_wrapped_and_prefixed_is_read_with_weights_only(tmp_path):
    state = reference_state("test_convnext")
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    bb = build("test_convnext", weights=str(path))
    assert_same_tensors(bb.model, state)


def test_cdft_model_checkpoint_keys_load_the_backbone_part(tmp_path):
    state = reference_state()
    full = {f"backbone.model.{k}": v for k, v in state.items()}
    full.update({"head.weight": torch.zeros(2, 64), "head.bias": torch.zeros(2), "adapter.norm_in.weight": torch.ones(64)})
    path = tmp_path / "model.safetensors"
    save_file(full, str(path))
    assert_same_tensors(build("test_vit", weights=str(path)).model, state)


def test_pretrained_classifier_is_dropped_other_extra_keys_are_reported(tmp_path):
    state = reference_state()
    state_with_head = dict(state, **{"head.weight": torch.zeros(512, 64), "head.bias": torch.zeros(512)})
    path = tmp_path / "clip.safetensors"
    save_file(state_with_head, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bb = build("test_vit", weights=str(path))
    assert sorted(bb.load_report.ignored) == ["head.bias", "head.weight"]

    save_file(dict(state, extra_projection=torch.zeros(3)), str(path))
    with pytest.raises(CdftError, match=r"1 tensor\(s\) that backbone 'test_vit\.r160_in1k' does not have: extra_projection"):
        build("test_vit", weights=str(path))


def test_layer_scale_tensors_the_model_lacks_are_refused_naming_init_values(tmp_path):
    """UNI's file into a ViT built without layer scale: once a warning and a silently weaker model."""
    state = reference_state()
    extra = {f"blocks.{i}.{ls}.gamma": torch.ones(64) for i in range(2) for ls in ("ls1", "ls2")}
    path = tmp_path / "uni_like.safetensors"
    save_file(dict(state, **extra), str(path))
    with pytest.raises(CdftError) as info:
        build("test_vit", weights=str(path))
    message = str(info.value)
    assert "\n" not in message
    assert "4 tensor(s)" in message and "blocks.0.ls1.gamma" in message and "(1 more)" in message
    assert "init_values (layer scale" in message


def test_register_and_gated_mlp_tensors_name_their_creation_arguments(tmp_path):
    state = reference_state()
    path = tmp_path / "reg.safetensors"
    save_file(dict(state, reg_token=torch.zeros(1, 4, 64), **{"blocks.0.mlp.fc1_g.weight": torch.zeros(8, 64)}), str(path))
    with pytest.raises(CdftError) as info:
        build("test_vit", weights=str(path))
    assert "reg_tokens (register tokens" in str(info.value) and "mlp_layer=SwiGLU" in str(info.value)


def test_missing_backbone_tensors_are_refused(tmp_path):
    state = reference_state()
    del state["blocks.0.attn.qkv.weight"], state["norm.weight"]
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with pytest.raises(CdftError, match=r"miss 2 of \d+ tensors of backbone 'test_vit\.r160_in1k'.*blocks\.0\.attn\.qkv\.weight"):
        build("test_vit", weights=str(path))


def test_open_clip_layout_is_converted_for_a_convnext_trunk(tmp_path):
    state = reference_state("test_convnext")
    layout = {f"visual.trunk.{k}": v for k, v in state.items()}
    layout["visual.head.proj.weight"] = torch.zeros(32, 64)
    layout["token_embedding.weight"] = torch.zeros(10, 32)  # the text tower is not ours
    path = tmp_path / "open_clip_model.safetensors"
    save_file(layout, str(path))
    assert_same_tensors(build("test_convnext", weights=str(path)).model, state)


def test_vit_file_loads_at_another_image_size_by_resampling_position_embeddings(tmp_path):
    state = reference_state()  # built at 160 px: 10×10 patches
    path = tmp_path / "vit160.safetensors"
    save_file(state, str(path))
    bb = build("test_vit", weights=str(path), image_size=96)
    assert bb.num_tokens() == 36
    assert bb.model.pos_embed.shape == (1, 37, 64)
    assert torch.equal(bb.model.patch_embed.proj.weight, state["patch_embed.proj.weight"])


def test_wrong_architecture_file_is_a_clear_error(tmp_path):
    path = tmp_path / "convnext.safetensors"
    save_file(reference_state("test_convnext"), str(path))
    with pytest.raises(CdftError, match=r"do not fit backbone 'test_vit\.r160_in1k'|miss \d+ of \d+ tensors"):
        build("test_vit", weights=str(path))

    other = reference_state("vit_tiny_patch16_224")  # a ViT of another width: shapes differ
    save_file(other, str(path))
    with pytest.raises(CdftError, match=r"do not fit backbone 'test_vit\.r160_in1k'.*shape mismatch"):
        build("test_vit", weights=str(path))


def test_file_missing_tensors_names_them(tmp_path):
    state = reference_state()
    del state["blocks.0.attn.qkv.weight"]
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with pytest.raises(CdftError, match=r"miss 1 of \d+ tensors.*blocks\.0\.attn\.qkv\.weight"):
        build("test_vit", weights=str(path))


def test_unreadable_or_absent_files(tmp_path):
    with pytest.raises(UsageError, match="does not exist.*--weights"):
        build("test_vit", weights=str(tmp_path / "nope.safetensors"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CdftError, match=r"cannot read weights file '.*garbage.pth' \(\w+Error: .+\); expected"):
        read_state_dict(garbage)
    listing = tmp_path / "list.pth"
    torch.save([1, 2, 3], listing)
    with pytest.raises(CdftError, match="does not hold a state dict"):
        read_state_dict(listing)


class Payload:
    """An arbitrary class: unpickling it would mean importing and running project code."""


def test_pickled_objects_are_refused(tmp_path):
    """weights_only=True: a file that needs arbitrary unpickling is not executed."""
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "obj": Payload()}, path)
    with pytest.raises(CdftError, match="cannot read weights file"):
        read_state_dict(path)


# -- hub cache and offline behaviour ------------------------------------------------------


def test_offline_with_nothing_cached_fails_fast_with_one_clear_line(offline_empty_cache):
    from cdft_core.models.model import build_model

    start = time.monotonic()
    with pytest.raises(CdftError) as info:
        build_model("vit_base_patch16_clip_224.laion2b", "none", 2)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert elapsed < 10
    assert "\n" not in message
    assert "'vit_base_patch16_clip_224.laion2b'" in message
    assert str(offline_empty_cache) in message and hf_cache_dir() == str(offline_empty_cache)
    assert "--weights" in message and "--no-pretrained" in message


def test_unreachable_hub_fails_fast_without_offline_flag(offline_empty_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    start = time.monotonic()
    with pytest.raises(CdftError, match="unreachable.*--weights"):
        build("convnext_base.fb_in22k", pretrained=True)
    assert time.monotonic() - start < 10


def test_pretrained_weights_come_from_the_local_hub_cache(offline_empty_cache, monkeypatch):
    state = reference_state()
    fill_hub_cache(str(offline_empty_cache), "timm/test_vit.r160_in1k", "model.safetensors", state)
    bb = build("test_vit", pretrained=True)
    assert_same_tensors(bb.model, state)
    assert bb.weights == "hub:timm/test_vit.r160_in1k"
    assert bb.data_config["source"] == "timm pretrained cfg test_vit.r160_in1k"

    # Not offline, hub unreachable: the cache is still used, with no network wait.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert_same_tensors(build("test_vit", pretrained=True).model, state)


def test_hub_cache_dir_follows_the_environment_at_call_time(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "a"))
    assert hf_cache_dir() == str(tmp_path / "a" / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "b"))
    assert hf_cache_dir() == str(tmp_path / "b")


def test_download_prefers_safetensors_and_falls_back_to_the_bin_file(offline_empty_cache, monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    import cdft_core.models.weights as weights

    state = reference_state()
    downloaded = tmp_path / "pytorch_model.bin"
    torch.save(state, downloaded)
    asked = []

    def fake_download(repo_id, filename, *, revision=None, cache_dir=None):
        asked.append((repo_id, filename, cache_dir))
        if filename == "model.safetensors":
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(downloaded)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(weights, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    bb = build("test_vit", pretrained=True)
    assert_same_tensors(bb.model, state)
    cache = str(offline_empty_cache)
    assert asked == [("timm/test_vit.r160_in1k", "model.safetensors", cache), ("timm/test_vit.r160_in1k", "pytorch_model.bin", cache)]
    assert "loaded 78 tensors from hub:timm/test_vit.r160_in1k" in bb.load_report.summary()


def test_a_failing_download_is_one_clear_line(offline_empty_cache, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    import cdft_core.models.weights as weights

    def fake_download(repo_id, filename, **kwargs):
        raise LocalEntryNotFoundError("connection reset\nwhile fetching")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(weights, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(CdftError, match="download failed: connection reset while fetching.*--weights") as info:
        build("test_vit", pretrained=True)
    assert "\n" not in str(info.value)


# -- files from other layouts: register tokens, LoRA runs, misnamed safetensors ------------


@pytest.mark.parametrize("direction", ["file has registers", "model has registers"])
def test_register_tokens_on_one_side_are_named_even_when_timm_s_converter_fails(tmp_path, direction):
    """timm's checkpoint_filter_fn fails resampling pos_embed first; the hint must still say reg_tokens."""
    import timm

    from cdft_core.models.backbone import load_backbone_weights

    torch.manual_seed(0)
    with_registers = timm.create_model("test_vit", reg_tokens=4, pretrained=False)
    plain = timm.create_model("test_vit", pretrained=False)
    file_model, target = (with_registers, plain) if direction == "file has registers" else (plain, with_registers)
    with pytest.raises(CdftError) as info:
        load_backbone_weights(target, file_model.state_dict(), name="test_vit", source="file x")
    message = str(info.value)
    assert "\n" not in message and "reg_tokens (register tokens, e.g. reg_tokens=4)" in message
    assert "another architecture" not in message


def _lora_checkpoint(tmp_path, metadata: dict[str, str] | None):
    """A LoRA-injected test_vit CdftModel with non-zero adapters, saved as a cdft checkpoint would be."""
    from cdft_core.models.lora import inject_lora
    from cdft_core.models.model import build_model

    torch.manual_seed(3)
    model = build_model("test_vit", "none", 2, pretrained=False, image_size=32)
    inject_lora(model, rank=4, alpha=12.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    path = tmp_path / "lora-best.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=metadata)
    return model, path


def test_a_lora_run_s_checkpoint_loads_as_the_merged_backbone(tmp_path):
    import json

    from cdft_core.models.lora import merge_lora

    spec = {"strategy": {"name": "lora", "options": {"rank": 4, "alpha": 12.0}}}
    lora_model, path = _lora_checkpoint(tmp_path, {"cdft_spec": json.dumps(spec)})
    state = read_state_dict(path)
    assert not any("lora_" in k or "base_layer" in k for k in state)
    loaded = build("test_vit", weights=str(path), image_size=32)
    merge_lora(lora_model.backbone.model)
    lora_model.eval(), loaded.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, got = lora_model.backbone.tokens(x), loaded.tokens(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    delta = (state["backbone.model.blocks.0.attn.qkv.weight"]
             - lora_model.state_dict()["backbone.model.blocks.0.attn.qkv.weight"]).abs().max()
    assert delta < 1e-6  # merge_lora's fold and ours agree


def test_lora_tensors_without_a_recorded_alpha_are_refused_in_one_line(tmp_path):
    _, path = _lora_checkpoint(tmp_path, None)
    with pytest.raises(UsageError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert "\n" not in message and "holds LoRA adapters (lora_A/lora_B) but not their alpha" in message
    assert "merge_and_unload" in message


def test_a_safetensors_file_is_recognised_whatever_its_name(tmp_path):
    state = reference_state()
    path = tmp_path / "weights.bin"
    save_file(state, str(path))
    model = build("test_vit", weights=str(path))
    assert_same_tensors(model.model, state)


def test_the_offline_message_names_the_switch_that_is_set(offline_empty_cache, monkeypatch):
    from cdft_core.models.model import build_model

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with pytest.raises(CdftError) as info:
        build_model("vit_base_patch16_clip_224.laion2b", "none", 2)
    assert "TRANSFORMERS_OFFLINE is set" in str(info.value) and "HF_HUB_OFFLINE" not in str(info.value)


def test_lora_tensors_that_do_not_fit_their_base_layer_are_one_line(tmp_path):
    import json

    spec = {"strategy": {"name": "lora", "options": {"rank": 4, "alpha": 12.0}}}
    model, path = _lora_checkpoint(tmp_path, {"cdft_spec": json.dumps(spec)})
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    key = next(k for k in state if k.endswith("lora_A.default.weight"))
    state[key] = torch.zeros(3, state[key].shape[1])  # rank 3 against B's rank 4
    save_file(state, str(path), metadata={"cdft_spec": json.dumps(spec)})
    with pytest.raises(UsageError, match=r"holds a LoRA layer whose shapes do not fit its base layer"):
        read_state_dict(path)


@pytest.mark.parametrize("alpha", ["nan", "1e400", "-2", "0"])
def test_a_recorded_lora_alpha_that_is_not_a_positive_number_is_refused(tmp_path, alpha):
    """alpha nan once loaded silently and made every feature NaN."""
    import json

    spec = json.dumps({"strategy": {"name": "lora", "options": {"alpha": alpha}}})
    _, path = _lora_checkpoint(tmp_path, {"cdft_spec": spec})
    with pytest.raises(UsageError, match=r"records LoRA alpha .*, not a positive number"):
        read_state_dict(path)


@pytest.mark.parametrize("shape", [(64,), (0, 64)])
def test_lora_tensors_of_no_matrix_shape_are_refused(tmp_path, shape):
    import json

    spec = json.dumps({"strategy": {"name": "lora", "options": {"alpha": 12.0}}})
    model, path = _lora_checkpoint(tmp_path, {"cdft_spec": spec})
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    key = next(k for k in state if k.endswith("lora_A.default.weight"))
    state[key] = torch.zeros(shape)
    save_file(state, str(path), metadata={"cdft_spec": spec})
    with pytest.raises(UsageError, match="holds a LoRA layer cdft cannot merge"):
        read_state_dict(path)
