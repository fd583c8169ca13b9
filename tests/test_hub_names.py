"""``hf-hub:ORG/NAME`` backbones: resolved from a Hugging Face cache made here (the machine has no hub),
the hub's answers simulated where the hub itself is needed, and one clear line when neither has the repo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from helpers_engine import engine_data, invoke, quick_args, subprocess_env
from safetensors.torch import save_file

from cdft_core.errors import CdftError, UsageError
from cdft_core.models.model import build_model, model_from_spec
from cdft_core.registry import get_registry

REPO = "acme/tiny-vit"
NAME = f"hf-hub:{REPO}"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
ARGS = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 64, "patch_size": 16}
MEAN, STD = (0.11, 0.22, 0.33), (0.44, 0.55, 0.66)


def tiny_config(architecture: str = "test_vit") -> dict:
    """A timm hub config.json (the layout timm's push_to_hub writes), with its own mean/std."""
    return {
        "architecture": architecture,
        "num_classes": 5,
        "num_features": 32,
        "model_args": ARGS,
        "pretrained_cfg": {
            "tag": "acme", "input_size": [3, 64, 64], "fixed_input_size": True, "mean": list(MEAN),
            "std": list(STD), "interpolation": "bilinear", "classifier": "head", "num_classes": 5,
            "some_future_timm_field": 1,
        },
    }


def random_state(seed: int = 3) -> dict[str, torch.Tensor]:
    """A randomly initialised model of the config's architecture, with its 5-class head (as published)."""
    torch.manual_seed(seed)
    model = timm.create_model("test_vit", num_classes=5, **ARGS)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def publish(cache: Path, repo: str = REPO, *, config: dict | str | bytes | None = None,
            state: dict | None = None, commit: str = COMMIT, ref: str = "main") -> Path:
    """Lay out ``repo`` as huggingface_hub caches it: refs/<ref> names the snapshot holding the files."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / ref).write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    config = tiny_config() if config is None else config
    if isinstance(config, dict):
        config = json.dumps(config)
    (snapshot / "config.json").write_bytes(config.encode() if isinstance(config, str) else config)
    if state is not None:
        save_file(state, str(snapshot / "model.safetensors"))
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty offline hub cache of this test's own (HF_HUB_CACHE wins over HF_HOME)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("cdft: warning:")]
    assert len(lines) == 1 and lines[0].startswith("cdft: error: "), stderr
    return lines[0]


def backbone_tensors(model) -> dict[str, torch.Tensor]:
    return dict(model.backbone.model.state_dict())


def assert_loaded(got: dict[str, torch.Tensor], published: dict[str, torch.Tensor]) -> None:
    """Every backbone tensor is the published one (the 5-class head is not part of a backbone)."""
    expected = {k: v for k, v in published.items() if not k.startswith("head.")}
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


# -- resolution from the cache --------------------------------------------------------


def test_show_backbone_reads_architecture_data_config_and_shapes_from_the_cache(cache):
    publish(cache, state=random_state())
    code, out, err = invoke("show", "backbone", NAME)
    assert code == 0, err
    lines = dict(line.split(": ", 1) for line in out.splitlines())
    assert lines["name"] == NAME and lines["provider"] == "timm" and lines["family"] == "vit"
    assert lines["architecture"] == "test_vit"
    assert "embed_dim=32" in lines["model_args"] and "depth=2" in lines["model_args"]
    assert lines["config"].startswith(f"cache: {cache}") and lines["config"].endswith(f"{COMMIT}/config.json")
    assert lines["weights"].startswith("cache: ") and lines["weights"].endswith("model.safetensors")
    assert (lines["embedding_width"], lines["pooled_width"], lines["tokens"]) == ("32", "32", "16")
    assert "mean=0.11, 0.22, 0.33" in lines["data_config"] and "interpolation=bilinear" in lines["data_config"]

    code, out, _ = invoke("show", "backbone", NAME, "--json")
    info = json.loads(out)["metadata"]
    assert info["data_config"]["input_size"] == [3, 64, 64] and info["data_config"]["std"] == list(STD)
    assert info["tokens"] == 16


def test_build_model_loads_exactly_the_cached_tensors_and_its_preprocessing(cache):
    published = random_state()
    publish(cache, state=published)
    model = build_model(NAME, "none", num_classes=3)
    assert_loaded(backbone_tensors(model), published)
    report = model.backbone.load_report
    assert report.loaded == len(published) - 2 and sorted(report.ignored) == ["head.bias", "head.weight"]
    assert model.spec["backbone"] == NAME and model.spec["weights"] == f"hub:{REPO}"
    config = model.data_config
    assert (config["mean"], config["std"], config["interpolation"]) == (MEAN, STD, "bilinear")
    assert config["input_size"] == (3, 64, 64) and "config.json of hub repo acme/tiny-vit" in config["source"]
    # evaluation rebuilds the architecture from the spec: the cached config.json alone suffices
    rebuilt = model_from_spec(model.spec)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    model.eval(), rebuilt.eval()
    assert torch.equal(model(x), rebuilt(x))


def test_a_revision_and_another_image_size(cache):
    published = random_state()
    publish(cache, state=published, ref="v1")
    model = build_model(f"{NAME}@v1", "cdtm", num_classes=2, image_size=32, adapter_options={"centres": 4})
    assert model.backbone.num_tokens() == 4 and model.data_config["input_size"] == (3, 32, 32)
    got = backbone_tensors(model)
    assert torch.equal(got["blocks.1.mlp.fc2.weight"], published["blocks.1.mlp.fc2.weight"])
    assert got["pos_embed"].shape[1] == 1 + 4  # timm's filter resampled the 64 px position embedding


def test_no_pretrained_needs_only_the_config_and_pretrained_names_the_missing_weights(cache):
    publish(cache)  # config.json, no weights
    model = build_model(NAME, "none", num_classes=2, pretrained=False)
    assert model.spec["weights"] == "random init" and "random init" in model.data_config["source"]
    with pytest.raises(CdftError, match=r"no pretrained weights for backbone 'hf-hub:acme/tiny-vit'.*HF_HUB_OFFLINE"):
        build_model(NAME, "none", num_classes=2)


def test_weights_file_with_a_hub_name_takes_the_architecture_from_the_cached_config(cache, tmp_path):
    publish(cache)
    published = random_state(seed=11)
    path = tmp_path / "mine.safetensors"
    save_file(published, str(path))
    model = build_model(NAME, "none", num_classes=2, weights=str(path))
    assert_loaded(backbone_tensors(model), published)
    assert model.spec["weights"] == f"file:{path}"
    assert f"assumed for weights from file {path}" in model.data_config["source"]


@pytest.mark.slow
def test_cdft_run_with_a_hub_backbone_trains_from_the_cached_weights(cache, tmp_path_factory, tmp_path):
    publish(cache, state=random_state())
    root, split = engine_data(tmp_path_factory)
    args = [a for a in quick_args(root, split, strategy="linear", backbone=NAME, epochs=1) if a != "--no-pretrained"]
    code, out, err = invoke(*args, "--output", str(tmp_path / "run"))
    assert code == 0, err
    assert f"backbone weights: loaded 30 tensors from hub:{REPO} ({cache}" in out + err
    assert NAME in (tmp_path / "run" / "config.yaml").read_text()


# -- one clear line ---------------------------------------------------------------------


def test_an_absent_repo_is_one_line_naming_repo_cache_download_and_weights(cache, tmp_path_factory):
    result = subprocess.run(
        [sys.executable, "-m", "cdft_cli", "show", "backbone", "hf-hub:acme/absent"], capture_output=True, text=True,
        timeout=120, env=subprocess_env(HF_HUB_CACHE=str(cache)),
    )
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    for part in ("hub repo acme/absent", f"not in the local Hugging Face cache at {cache}", "HF_HUB_OFFLINE is set",
                 "`huggingface-cli download acme/absent`", "~/.cache/huggingface/hub", "--weights FILE"):
        assert part in line, part
    assert "HF_TOKEN" not in line  # nothing says it is gated

    root, split = engine_data(tmp_path_factory)
    code, _, err = invoke(*quick_args(root, split, strategy="linear", backbone="hf-hub:acme/absent"))
    assert code == 2 and "hub repo acme/absent is not in the local Hugging Face cache" in one_error_line(err)


def test_a_gated_curated_repo_says_accept_the_licence_and_set_hf_token(cache):
    with pytest.raises(UsageError) as info:  # a revision takes the generic path; the row still says gated
        get_registry().get("backbone", "hf-hub:MahmoodLab/UNI@main")
    message = str(info.value)
    assert "MahmoodLab/UNI is gated: accept its licence at https://huggingface.co/MahmoodLab/UNI and set HF_TOKEN" in message
    assert "--revision main" in message and "\n" not in message


def test_the_hubs_401_or_403_adds_the_licence_and_hf_token(cache, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    import cdft_core.models.hub_config as hub_config

    def refused(repo_id, filename, **kwargs):
        raise GatedRepoError("403 Client Error: access to this repo is restricted",
                             response=SimpleNamespace(status_code=403, headers={}, request=None))

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub_config, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refused)
    with pytest.raises(UsageError) as info:
        get_registry().get("backbone", "hf-hub:acme/gated-model")
    message = str(info.value)
    assert "the hub refused access" in message and "acme/gated-model is gated" in message and "HF_TOKEN" in message

    publish(cache, "acme/gated-model")  # a copied cache still works when the hub refuses this machine
    assert hub_config.hub_config("hf-hub:acme/gated-model").origin == "cache"


def test_a_reachable_hub_is_asked_first_and_weights_come_from_the_configs_snapshot(cache, monkeypatch):
    import huggingface_hub

    import cdft_core.models.hub_config as hub_config

    published = random_state()
    snapshot = publish(cache, "acme/online", state=published)
    asked = []

    def download(repo_id, filename, *, revision=None, cache_dir=None):
        asked.append((repo_id, filename, revision, cache_dir))
        return str(snapshot / filename)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub_config, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    model = build_model("hf-hub:acme/online", "none", num_classes=2)
    assert asked == [("acme/online", "config.json", None, str(cache))]  # the weights were cached at that snapshot
    assert model.backbone.hub_config.origin == "hub" and model.backbone.hub_config.weights_repo == f"acme/online@{COMMIT}"
    assert_loaded(backbone_tensors(model), published)


@pytest.mark.parametrize(
    "config,expected",
    [
        (tiny_config("no_such_architecture"), "names architecture 'no_such_architecture', which timm"),
        ("{not json", "is not valid JSON"),
        ('["a", "list"]', "holds a JSON list, not an object"),
        ({"model_args": {}}, "names no architecture"),
        (" " * (1 << 20) + "{}", "is larger than 1048576 bytes"),
        ({**tiny_config(), "model_args": {**ARGS, "no_such_argument": 1}}, "cannot be built with"),
        ({**tiny_config(), "model_args": {**ARGS, "embed_dim": 33}}, "cannot be built with"),
    ],
    ids=["unknown-architecture", "not-json", "not-an-object", "no-architecture", "huge", "unknown-model-arg",
         "impossible-model-arg"],
)
def test_an_unusable_config_is_one_line(cache, config, expected):
    publish(cache, config=config)
    with pytest.raises(UsageError, match=expected) as info:
        build_model(NAME, "none", num_classes=2, pretrained=False)
    assert "\n" not in str(info.value) and len(str(info.value)) < 600


def test_unknown_architecture_through_the_cli_exits_2_without_traceback(cache):
    publish(cache, config=tiny_config("no_such_architecture"))
    code, _, err = invoke("show", "backbone", NAME)
    assert code == 2 and "names architecture 'no_such_architecture'" in one_error_line(err)


@pytest.mark.parametrize("name", ["hf-hub:no-org", "hf-hub:a/b/c", "hf-hub:acme/x@", "hf-hub:acme/x--y"])
def test_a_malformed_hub_name_is_a_usage_error(name):
    with pytest.raises(UsageError, match="is not a hub model name; write hf-hub:ORG/NAME"):
        get_registry().get("backbone", name)


# -- curated rows and the weight-source helper ----------------------------------------


@pytest.mark.parametrize("name", ["hf-hub:MahmoodLab/UNI", "hf-hub:mahmoodlab/uni"])
def test_a_curated_rows_repo_resolves_to_the_row(name, cache):
    component = get_registry().get("backbone", name)
    assert (component.name, component.provider) == ("uni", "foundation")


def test_weight_source_is_the_one_choice_of_every_builder(cache, tmp_path, monkeypatch):
    """File, hub or random: timm names, curated rows and hub names all choose through weight_source."""
    import cdft_core.models.backbone as backbone
    import cdft_core.models.foundation as foundation
    import cdft_core.models.hub_backbone as hub_backbone
    from cdft_core.models.weights import weight_source

    located = []
    with pytest.raises(UsageError, match="does not exist"):  # a --weights file is read before anything else
        weight_source("m", pretrained=True, weights=str(tmp_path / "nope.safetensors"), locate=located.append)
    random = weight_source("m", pretrained=False, weights=None, locate=located.append)
    hub = weight_source("m", pretrained=True, weights=None, locate=lambda: ("/c/model.safetensors", "hub:o/n"))
    assert located == [] and (random.kind, random.source, random.note, random.state_dict()) == ("random", "random init", "random init", None)
    assert (hub.kind, hub.source, hub.origin, hub.note) == ("hub", "hub:o/n", "hub:o/n (/c/model.safetensors)", "")

    calls = []

    def spy(model, **kwargs):
        calls.append(model)
        return weight_source(model, **kwargs)

    for module in (backbone, foundation, hub_backbone):
        monkeypatch.setattr(module, "weight_source", spy)
    publish(cache)
    path = tmp_path / "w.safetensors"
    save_file(random_state(), str(path))
    assert build_model(NAME, "none", 2, weights=str(path)).spec["weights"] == f"file:{path}"
    assert build_model("test_vit", "none", 2, pretrained=False).spec["weights"] == "random init"
    foundation.build_foundation_backbone("uni", pretrained=False, device="meta")
    assert calls == [NAME, "test_vit.r160_in1k", "uni"]


def test_a_checkpoint_rebuilds_from_its_recorded_config_without_hub_or_cache(cache, tmp_path):
    import shutil

    from cdft_core.models import hub_config

    published = random_state()
    publish(cache, state=published)
    model = build_model(NAME, "none", num_classes=3)
    assert model.spec["hub_config"]["architecture"] == "test_vit" and model.spec["hub_config"]["snapshot"] == COMMIT
    shutil.rmtree(cache)  # evaluated elsewhere: no hub, no cache
    hub_config._MEMO.clear()
    rebuilt = model_from_spec(json.loads(json.dumps(model.spec)))  # as a checkpoint's metadata stores it
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(model.eval()(x), rebuilt.eval()(x))
    assert rebuilt.data_config["mean"] == model.data_config["mean"]
    hub_config._MEMO.clear()
    code, _, err = invoke("show", "backbone", NAME)  # the name alone still needs its config.json
    assert code == 2 and "not in the local Hugging Face cache" in one_error_line(err)


def test_layer_names_in_model_args_build_a_swiglu_vit_like_virchow2(cache):
    """Virchow2's and UNI2-h's config.json name their layers as strings: timm's SwiGLUPacked
    (a functools.partial) and torch's SiLU; also spelt in full."""
    config = tiny_config("vit_small_patch16_224")
    config["model_args"] = {**ARGS, "mlp_ratio": 5.3375, "reg_tokens": 4, "init_values": 1e-5,
                            "mlp_layer": "SwiGLUPacked", "act_layer": "torch.nn.SiLU"}
    publish(cache, config=config)
    model = build_model(NAME, "none", num_classes=3, pretrained=False)
    block = model.backbone.model.blocks[0]
    assert type(block.mlp).__name__ == "GluMlp" and isinstance(block.mlp.act, torch.nn.SiLU)
    assert model.backbone.model.num_reg_tokens == 4 and model.spec["num_tokens"] == 16  # registers excluded
    code, out, err = invoke("show", "backbone", NAME)
    assert code == 0, err
    assert "mlp_layer=SwiGLUPacked" in out
