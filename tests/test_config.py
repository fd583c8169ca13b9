"""The run configuration: paper defaults, YAML + CLI precedence, validation, and the presets."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers_engine import REPO, engine_data, invoke, quick_args

from cdft_core.config import RunConfig, dump_yaml, load_yaml, merge, parse_key_values, validate
from cdft_core.errors import UsageError

PRESETS = sorted((REPO / "configs").glob("*.yaml"))


def test_defaults_are_the_paper_recipe():
    c = RunConfig()
    assert (c.optimizer, c.lr, c.weight_decay, c.batch_size, c.epochs) == ("adam", 1e-4, 1e-3, 8, 100)
    assert (c.warmup_epochs, c.warmup_start_factor, c.seed, c.image_size) == (2.0, 0.01, 1, None)
    assert c.precision == "auto" and c.device == "auto"


def test_yaml_then_command_line(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("dataset: breakhis\nlr: 1.0e-3\nepochs: 5\nadapter_options:\n  num_centres: 10\n")
    config = merge(RunConfig(), load_yaml(str(preset)), source=str(preset))
    config = merge(config, {"epochs": 7, "adapter_options": {"depth": 2}}, source="command line")
    assert (config.dataset, config.lr, config.epochs) == ("breakhis", 1e-3, 7)
    assert config.adapter_options == {"num_centres": 10, "depth": 2}  # merged key by key
    assert merge(RunConfig(), load_yaml_text(tmp_path, dump_yaml(config)), source="x") == config  # saved config round trip


def load_yaml_text(tmp_path: Path, text: str) -> dict:
    path = tmp_path / "saved.yaml"
    path.write_text(text)
    return load_yaml(str(path))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batch_sise": 8}, "did you mean 'batch_size'"),
        ({"epochs": "many"}, "epochs must be an integer"),
        ({"lr": "fast"}, "lr must be a number"),
        ({"pretrained": "maybe"}, "pretrained must be true or false"),
        ({"dataset_options": ["task"]}, "dataset_options must be a mapping"),
    ],
)
def test_bad_keys_and_types(overrides, message):
    with pytest.raises(UsageError, match=message):
        merge(RunConfig(), overrides, source="test")


def test_key_values():
    assert parse_key_values(["lr_factor=0.1", "stage_epochs=10,5", "flag=true"], option="--x") == {
        "lr_factor": 0.1, "stage_epochs": "10,5", "flag": True}
    assert parse_key_values(["magnification=200"], option="--x", typed=False) == {"magnification": "200"}
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_key_values(["novalue"], option="--dataset-option")


def test_validate(tmp_path):
    good = RunConfig(dataset="breakhis", data_root=str(tmp_path), backbone="test_vit")
    validate(good)
    cases = [
        ({"val_fold": 2, "test_fold": 2}, "must differ"),
        ({"batch_size": 0}, "--batch-size must be at least 1"),
        ({"dataset": None}, "--dataset"),
        ({"device": "gpu"}, "--device 'gpu' is not one of .*did you mean 'cuda'"),
        ({"precision": "bf61"}, "did you mean 'bf16'"),
        ({"data_root": str(tmp_path / "missing")}, "--data-root .* does not exist"),
        ({"split_file": str(tmp_path / "none.csv")}, "--split-file .* does not exist"),
        ({"warmup_start_factor": 0.0}, "--warmup-start-factor"),
        ({"weights": "w.safetensors", "pretrained": False}, "contradict"),
        ({"split_file": __file__, "folds": 3}, "drop --folds"),  # a split file has its folds: never ignore --folds
        ({"compile": True, "compile_mode": "max_autotune"}, "did you mean 'max-autotune'"),
        ({"compile_mode": "reduce-overhead"}, "only applies to a compiled model; add --compile"),
        ({"seed": 99999999999999999999999}, r"--seed must be an integer in \[0, 4294967295\], got 9+$"),
        ({"seed": 2**32}, r"--seed must be an integer in \[0, 4294967295\]"),
        ({"seed": -1}, r"--seed must be an integer in \[0, 4294967295\], got -1"),
    ]
    for overrides, message in cases:
        with pytest.raises(UsageError, match=message):
            validate(merge(good, overrides, source="test"))
    validate(merge(good, {"compile": True, "compile_mode": "max-autotune"}, source="test"))
    validate(merge(good, {"seed": 2**32 - 1}, source="test"))  # the largest seed numpy's folds take


def test_presets_cover_the_paper_grid():
    names = {p.stem for p in PRESETS}
    assert names == {f"{d}-{b}-{s}" for d in ("breakhis", "hcrf") for b in ("vit", "convnext")
                     for s in ("linear", "full", "frt", "staged")}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_starts_with_its_command_and_resolves(preset):
    from cdft_core.training.preflight import preflight

    first = preset.read_text().splitlines()[0]
    assert first.startswith(f"# cdft run --config configs/{preset.name} --data-root ")
    config = merge(RunConfig(), load_yaml(str(preset)), source=preset.name)
    dataset, family, strategy = preset.stem.split("-")
    assert (config.dataset, config.strategy) == (dataset, strategy)
    assert config.backbone.startswith(family)
    assert (config.lr, config.batch_size, config.epochs, config.weight_decay) == (1e-4, 8, 100, 1e-3)
    assert (config.optimizer, config.warmup_epochs, config.warmup_start_factor, config.seed) == ("adam", 2.0, 0.01, 1)
    # the paper trained at 224 px; convnext_base.clip_laion2b_augreg's pretrained config says 256
    assert config.image_size == 224
    assert config.protocol == ("low-data" if dataset == "hcrf" else "standard")
    built, adapter = preflight(config)  # every name resolves in the registry
    assert adapter == ("cdtm" if strategy in ("frt", "staged") else "none")
    assert len(built.stages) == (2 if strategy == "staged" else 1)


def test_preset_plus_overrides_from_the_cli(tmp_path_factory, tmp_path):
    """`--config` then options: the resolved config saved with the run shows both."""
    root, split = engine_data(tmp_path_factory)
    preset = tmp_path / "quick.yaml"
    preset.write_text("strategy: linear\nepochs: 1\nbatch_size: 4\nlr: 0.01\n")
    args = quick_args(root, split, strategy="linear", epochs=1)
    for option in ("--epochs", "--strategy", "--lr"):  # left to the preset
        at = args.index(option)
        del args[at : at + 2]
    code, _, err = invoke(*args, "--config", str(preset), "--batch-size", "6", "--output", str(tmp_path / "run"))
    assert code == 0, err
    saved = load_yaml(str(tmp_path / "run" / "config.yaml"))
    assert (saved["strategy"], saved["epochs"], saved["lr"], saved["batch_size"]) == ("linear", 1, 0.01, 6)


@pytest.mark.parametrize(("requested", "message"), [
    ("gpu", "--device 'gpu' is not one of auto, cpu, cuda, cuda:N"),
    ("cuda:x", "--device 'cuda:x' is not one of auto, cpu, cuda, cuda:N"),
    ("cuda:0", "--device cuda:0 was asked for but no CUDA device is available; use --device cpu"),
    ("cuda", "--device cuda was asked for but no CUDA device is available; use --device cpu"),
])
def test_devices_torch_cannot_use_here_are_usage_errors(requested, message, monkeypatch):
    """predict/embed/explain pass --device straight here: torch's own errors named no fix."""
    import torch

    from cdft_core.config import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError) as info:
        resolve_device(requested)
    assert str(info.value) == message
    assert resolve_device("cpu") == "cpu" and resolve_device("auto") == "cpu"


def test_a_cuda_index_past_the_machine_s_devices_is_refused(monkeypatch):
    import torch

    from cdft_core.config import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cuda") == "cuda"
    with pytest.raises(UsageError, match=r"^--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1$"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("command", [("eval", "no-such-run"), ("predict", "no-such-run", "x.png", "-o", "p.csv"),
                                     ("embed", "no-such-run", "x.png", "-o", "e.safetensors"),
                                     ("explain", "no-such-run", "x.png", "-o", "cams")])
def test_every_command_refuses_a_device_it_cannot_use_in_one_line(command, tmp_path, monkeypatch):
    from helpers_engine import invoke

    monkeypatch.chdir(tmp_path)
    code, _, err = invoke(*command, "--device", "gpu")
    assert code == 2 and err.strip() == "cdft: error: --device 'gpu' is not one of auto, cpu, cuda, cuda:N"
