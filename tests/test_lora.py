"""LoRA through peft (``--strategy lora`` / ``staged-lora``) and the model-changing step of
the strategy API: which layers are adapted, base tensors bit-identical after training,
LoRA tensors trained, ``cdft eval`` of the checkpoint equal to the summary, exact resume,
export merging the adapters, a 2-process run, and a third-party strategy that changes the
model the same way."""

from __future__ import annotations

import json

import pytest
import torch
from helpers_engine import (
    comparable,
    engine_data,
    invoke,
    quick_args,
    read_json,
    run_subprocess,
    subprocess_env,
)
from safetensors.torch import load_file

pytest.importorskip("peft", reason="needs the lora extra: pip install 'cdft[lora]'")

_RUNS: dict[str, tuple] = {}


def _lora_run(factory, strategy: str, backbone: str = "test_vit", extra: tuple[str, ...] = ()):
    """A completed in-process run: (run dir, {stage name: state dict at the stage's start})."""
    key = f"{strategy}-{backbone}-{'-'.join(extra)}"
    if key not in _RUNS:
        import cdft_core.strategy as strategy_module

        root, split = engine_data(factory)
        run_dir = factory.mktemp("lora") / "run"
        starts: dict[str, dict] = {}
        apply_stage = strategy_module.apply_stage

        def recording(model, stage):
            starts[stage.name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return apply_stage(model, stage)

        strategy_module.apply_stage = recording
        try:
            code, out, err = invoke(*quick_args(root, split, strategy=strategy, backbone=backbone, epochs=2, extra=extra),
                                    "--output", str(run_dir), "--no-tensorboard")
        finally:
            strategy_module.apply_stage = apply_stage
        assert code == 0, err
        _RUNS[key] = (run_dir, starts, err)
    return _RUNS[key]


def _tiny(backbone: str):
    from cdft_core.models.model import build_model

    torch.manual_seed(0)
    return build_model(backbone, "cdtm", 3, pretrained=False, image_size=32)


# -- which layers ------------------------------------------------------------------------
def test_auto_targets_are_attention_and_mlp_of_a_vit_and_pointwise_layers_of_a_convnext():
    from cdft_core.models.lora import lora_targets

    vit = lora_targets(_tiny("test_vit").backbone.model)
    assert vit and all(name.rsplit(".", 1)[-1] in ("qkv", "proj", "fc1", "fc2") for name in vit)
    assert "patch_embed.proj" not in vit and len(vit) == 4 * len(_tiny("test_vit").backbone.model.blocks)
    convnext = _tiny("test_convnext").backbone.model
    targets = lora_targets(convnext)
    assert targets and all(name.endswith(("mlp.fc1", "mlp.fc2")) for name in targets)
    assert not any("conv_dw" in name or name.startswith("stem") for name in targets)  # depthwise and patchify stay
    resnet = _tiny("test_resnet").backbone.model
    assert all(resnet.get_submodule(n).kernel_size == (1, 1) for n in lora_targets(resnet))


@pytest.mark.filterwarnings("error::UserWarning")  # peft warned "already merged": cdft merged out_proj twice
def test_multihead_attention_is_adapted_as_a_whole_and_merges_back():
    """open_clip's ViTs use nn.MultiheadAttention, whose out_proj is read as a tensor, not called."""
    from peft.tuners.lora import LoraLayer

    from cdft_core.models.lora import ADAPTER_NAME, lora_targets, merge_lora

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))

        def forward(self, x):
            return self.mlp(self.attn(x, x, x, need_weights=False)[0])

    import peft

    torch.manual_seed(0)
    block = Block()
    assert lora_targets(block) == ["attn", "mlp.0", "mlp.2"]  # not attn.out_proj on its own
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=lora_targets(block)), block,
                                 adapter_name=ADAPTER_NAME)
    assert isinstance(block.attn, LoraLayer)
    with torch.no_grad():
        for name, param in block.named_parameters():
            if ".lora_B." in name:
                param.normal_()
    x = torch.randn(2, 5, 16)
    before = block.eval()(x)
    assert merge_lora(block) == 4  # peft adapts the attention and, inside it, its out_proj
    assert not any(isinstance(m, LoraLayer) for m in block.modules())
    torch.testing.assert_close(block(x), before, rtol=1e-4, atol=1e-5)


def test_named_targets_match_suffixes_and_unknown_names_are_one_line():
    from cdft_core.errors import UsageError
    from cdft_core.models.lora import lora_targets

    model = _tiny("test_vit").backbone.model
    assert lora_targets(model, "qkv") == [f"blocks.{i}.attn.qkv" for i in range(len(model.blocks))]
    assert len(lora_targets(model, "qkv, fc2")) == 2 * len(model.blocks)
    with_proj = lora_targets(model, "qkv,proj")  # the documented example: attention only, not the patch embedding
    assert "patch_embed.proj" not in with_proj and len(with_proj) == 2 * len(model.blocks)
    assert lora_targets(model, "patch_embed.proj") == ["patch_embed.proj"]  # a full name reaches it on purpose
    with pytest.raises(UsageError, match="'attention' matches no linear.*layers end in e.g."):
        lora_targets(model, "attention")


def test_injected_model_computes_the_same_until_lora_trains_and_merging_keeps_the_function():
    from cdft_core.models.lora import inject_lora, is_lora_parameter, merge_lora

    model = _tiny("test_vit").eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    names_before = set(model.state_dict())
    line = inject_lora(model, rank=4, alpha=8)
    assert "LoRA in 24 layers (rank 4, alpha 8" in line and "% of the backbone" in line
    assert torch.equal(model(x), before)  # lora_B starts at zero
    lora = [n for n in model.state_dict() if is_lora_parameter(n)]
    assert lora and all(".lora_A.default." in n or ".lora_B.default." in n for n in lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_()
    changed = model(x)
    assert not torch.allclose(changed, before)
    assert merge_lora(model) == 24
    assert set(model.state_dict()) == names_before  # plain layers, plain names
    torch.testing.assert_close(model(x), changed, rtol=1e-4, atol=1e-5)


def test_bad_options_and_a_missing_peft_are_one_line(monkeypatch):
    import builtins

    code, out, err = invoke("show", "strategy", "lora")
    assert code == 0 and "rank=8" in out + err and "changes_model: True" in out, out + err
    from cdft_core.errors import UsageError
    from cdft_core.strategy import build_strategy

    with pytest.raises(UsageError, match="dropout='1.5' must be below 1"):
        build_strategy("lora", {"dropout": "1.5"})
    with pytest.raises(UsageError, match="rank='0' must be at least 1"):
        build_strategy("lora", {"rank": "0"})
    with pytest.raises(UsageError, match="rank=1.5 must be a whole number"):
        build_strategy("lora", {"rank": 1.5})  # what the CLI's typed KEY=VALUE gives for rank=1.5
    with pytest.raises(UsageError, match="does not take option"):
        build_strategy("lora", {"ranks": "4"})

    real_import = builtins.__import__

    def no_peft(name, *args, **kwargs):
        if name == "peft" or name.startswith("peft."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    from cdft_core.models.lora import inject_lora

    with pytest.raises(UsageError, match=r"pip install 'cdft\[lora\]'"):
        inject_lora(_tiny("test_vit"))


# -- training --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["test_vit", "test_convnext"])
def test_lora_trains_only_lora_adapter_and_head_and_eval_reproduces_the_summary(tmp_path_factory, backbone):
    from cdft_core.models.lora import is_lora_parameter

    run_dir, starts, err = _lora_run(tmp_path_factory, "lora", backbone)
    assert "strategy lora changed the model: LoRA in" in err
    assert "took no part in the first step's loss" not in err  # every LoRA tensor gets a gradient
    start = starts["lora"]
    best = load_file(str(run_dir / "stage1-lora" / "best.safetensors"))
    assert set(best) == set(start)
    lora = [n for n in best if is_lora_parameter(n)]
    base = [n for n in best if n.startswith("backbone.") and not is_lora_parameter(n)]
    assert lora and base
    assert all(torch.equal(best[n], start[n]) for n in base)  # the frozen base: bit-identical
    assert all(not torch.equal(best[n], start[n]) for n in lora if ".lora_B." in n)  # trained from zero
    assert not torch.equal(best["head.weight"], start["head.weight"])

    summary = read_json(run_dir / "summary.json")
    code, out, err = invoke("eval", str(run_dir), "--json")
    assert code == 0, err
    assert comparable(json.loads(out)["metrics"]) == comparable(summary["test"])


@pytest.mark.slow
def test_staged_lora_keeps_lora_at_zero_in_frt_then_trains_it(tmp_path_factory):
    run_dir, starts, _ = _lora_run(tmp_path_factory, "staged-lora")
    first = load_file(str(run_dir / "stage1-frt" / "best.safetensors"))
    second = load_file(str(run_dir / "stage2-lora" / "best.safetensors"))
    lora_b = [n for n in first if ".lora_B." in n]
    assert all(not first[n].any() for n in lora_b)  # frozen at zero: stage 1 is plain frt
    assert all(torch.equal(starts["lora"][n], first[n]) for n in first)  # stage 2 starts from stage 1's best
    assert any(second[n].any() for n in lora_b)
    summary = read_json(run_dir / "summary.json")
    assert [s["name"] for s in summary["stages"]] == ["frt", "lora"]


@pytest.mark.slow
def test_lora_with_gradient_checkpointing_trains_the_same(tmp_path_factory):
    plain, _, _ = _lora_run(tmp_path_factory, "lora")
    checkpointed, _, _ = _lora_run(tmp_path_factory, "lora", extra=("--grad-checkpointing",))
    ours = load_file(str(checkpointed / "stage1-lora" / "best.safetensors"))
    theirs = load_file(str(plain / "stage1-lora" / "best.safetensors"))
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_matches_the_uninterrupted_lora_run(tmp_path_factory, tmp_path):
    reference, _, _ = _lora_run(tmp_path_factory, "staged-lora")
    root, split = engine_data(tmp_path_factory)
    run_dir = tmp_path / "run"
    args = quick_args(root, split, strategy="staged-lora", epochs=2)
    env = subprocess_env(CDFT_TEST_FAULT="stage=2,epoch=1,step=2,action=sigterm")
    done = run_subprocess(*args, "--output", str(run_dir), "--no-tensorboard", env=env)
    assert done.returncode == 143, done.stderr[-2000:]
    resumed = run_subprocess("run", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ours, theirs = read_json(run_dir / "summary.json"), read_json(reference / "summary.json")
    assert [s["test"] for s in ours["stages"]] == [s["test"] for s in theirs["stages"]]
    a = load_file(str(run_dir / "stage2-lora" / "best.safetensors"))
    b = load_file(str(reference / "stage2-lora" / "best.safetensors"))
    assert all(torch.equal(a[n], b[n]) for n in b)


@pytest.mark.slow
def test_export_merges_lora_into_plain_layers(tmp_path_factory, tmp_path):
    pytest.importorskip("onnxruntime", reason="needs the export extra")
    from cdft_core.inference.export import read_onnx_metadata

    run_dir, _, _ = _lora_run(tmp_path_factory, "lora")
    out = tmp_path / "model.onnx"
    code, stdout, err = invoke("export", str(run_dir), "-o", str(out))
    assert code == 0, err
    assert "max |difference| vs PyTorch" in stdout
    assert read_onnx_metadata(str(out))["merged"] == "lora"
    import onnx

    names = {init.name for init in onnx.load(str(out)).graph.initializer}
    assert not any("lora" in name for name in names)


@pytest.mark.slow
def test_a_merge_that_changes_the_logits_writes_nothing(tmp_path_factory, tmp_path, monkeypatch):
    import cdft_core.models.model_change as model_change

    run_dir, _, _ = _lora_run(tmp_path_factory, "lora")

    def bad_merge(model, *, registry=None):
        with torch.no_grad():
            model.head.bias.add_(1.0)  # what a wrong merge would do to the logits
        return True

    monkeypatch.setattr(model_change, "merge_change", bad_merge)
    code, _, err = invoke("export", str(run_dir), "-o", str(tmp_path / "model.onnx"))
    assert code == 1 and "merging the lora layers changed the logits by up to 1" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_lora_run_matches_one_process_evaluation(tmp_path_factory):
    root, split = engine_data(tmp_path_factory)
    run_dir = tmp_path_factory.mktemp("lora-ddp") / "run"
    done = run_subprocess(*quick_args(root, split, strategy="staged-lora", epochs=1), "--output", str(run_dir),
                          "--nproc-per-node", "2", "--no-tensorboard")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = read_json(run_dir / "summary.json")
    assert summary["world_size"] == 2
    for stage in summary["stages"]:
        code, out, err = invoke("eval", str(run_dir / stage["checkpoint"]), "--split", "test", "--json")
        assert code == 0, err
        assert comparable(json.loads(out)["metrics"]) == comparable(stage["test"])


# -- the plugin API: a third-party strategy that changes the model -------------------------
def _add_prompt(model) -> str:
    """A toy 'visual prompt': one learned vector added to the head's input (zero at start)."""
    model.head.register_parameter("prompt", torch.nn.Parameter(torch.zeros(model.head.in_features)))
    model.head.register_forward_pre_hook(lambda module, args: (args[0] + module.prompt,))
    return "added head.prompt"


def _prompt_labels(params):
    from cdft_core import FROZEN, TRAINABLE

    return {n: TRAINABLE if n.startswith(("head.", "adapter.")) else FROZEN for n in params}


def test_a_third_party_model_change_is_replayed_when_a_checkpoint_is_rebuilt():
    from cdft_core import Stage, Strategy, hookimpl, load_registry
    from cdft_core.models.model import model_from_spec
    from cdft_core.models.model_change import change_model

    class Prompts:
        @hookimpl
        def register_strategies(self, register):
            register("prompt", lambda: Strategy("prompt", (Stage("prompt", _prompt_labels, {"trainable": {}}),),
                                                "cdtm", change_model=_add_prompt))

    registry = load_registry(entry_points=False, extra_plugins=[("prompts", Prompts())])
    strategy = registry.get("strategy", "prompt").factory()
    model = _tiny("test_vit")
    lines: list[str] = []
    change_model(model, strategy, "prompt", {}, lines.append, registry=registry)
    assert lines == ["strategy prompt changed the model: added head.prompt"]
    assert model.spec["strategy"] == {"name": "prompt", "options": {}}
    with torch.no_grad():
        model.head.prompt.fill_(0.5)
    rebuilt = model_from_spec(model.spec, registry=registry)
    rebuilt.load_state_dict(model.state_dict())  # strict: the prompt exists before loading
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x))
    assert "head.prompt" in dict(rebuilt.named_parameters())
    from cdft_core.errors import UsageError

    with pytest.raises(UsageError, match="trained with strategy 'prompt', which changed the model before training, "
                                         "and no installed plugin provides it"):
        model_from_spec(model.spec)  # the global registry has no such plugin
    from cdft_core import use_registry

    use_registry(registry)  # what a test does to train or evaluate with in-process plugins
    try:
        assert "head.prompt" in dict(model_from_spec(model.spec).named_parameters())
    finally:
        use_registry(None)


def test_the_spec_records_every_option_of_the_change_defaults_included():
    from cdft_core.models.model_change import change_model
    from cdft_core.strategy import build_strategy

    model = _tiny("test_vit")
    change_model(model, build_strategy("staged-lora", {"rank": "4"}), "staged-lora", {"rank": "4"})
    assert model.spec["strategy"] == {"name": "staged-lora", "options": {
        "rank": "4", "alpha": 16, "dropout": 0.1, "target_modules": "auto", "lr_scale": 1.0, "stage_epochs": None,
        "lr_factor": 1.0}}


def test_strategies_without_a_model_change_leave_the_spec_alone():
    from cdft_core.models.model_change import change_model, merge_change
    from cdft_core.strategy import build_strategy

    model = _tiny("test_vit")
    change_model(model, build_strategy("frt"), "frt", {})
    assert "strategy" not in model.spec and merge_change(model) is False


def test_the_memory_check_counts_lora_activations_through_the_frozen_backbone():
    """LoRA trains no base weight, but its backward runs through every block: the floor keeps
    every block's output per image, as full fine-tuning does (parameters at frozen cost)."""
    from cdft_core.strategy import build_strategy
    from cdft_core.training.preflight import input_cost, needed_bytes, trains_backbone

    cost = input_cost("test_vit", 64)
    lora, full, frt = (build_strategy(name) for name in ("lora", "full", "frt"))
    assert not trains_backbone(lora, cost) and lora.change_model is not None

    def floor(strategy, backward):
        return needed_bytes(cost, batch_size=32, eval_batch_size=8, trains=trains_backbone(strategy, cost),
                            value_bytes=4, backward=backward)

    with_lora = floor(lora, backward=True)
    assert floor(frt, backward=False) < with_lora < floor(full, backward=True)
    assert with_lora - floor(frt, backward=False) == 32 * 4 * (cost.block_values - 2 * cost.largest_block)
    from cdft_core.config import RunConfig
    from cdft_core.errors import UsageError
    from cdft_core.training.preflight import check_memory

    between = (floor(frt, backward=False) + with_lora) // 2
    config = RunConfig(backbone="test_vit", image_size=64, batch_size=32, eval_batch_size=8, precision="fp32")
    check_memory(config, frt, "cpu", cost=cost, available=(between, "test memory"))
    with pytest.raises(UsageError, match="--batch-size 32 needs at least"):
        check_memory(config, lora, "cpu", cost=cost, available=(between, "test memory"))
