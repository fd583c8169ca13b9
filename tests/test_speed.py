"""The GPU step's decisions (cdft_core.training.speed), checked without a GPU: channels_last
only for convolutional backbones on CUDA, fused/foreach Adam only on CUDA, loader options by
device and workers; optimizer states that resume across implementations and layouts; epoch
keys that make persistent workers safe; ``--compile`` keeping state-dict keys and matching
eager metrics on CPU. CPU results staying bit-identical is what the engine, resume and
distributed tests check (they compare against fixed references)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from helpers_engine import REPO, engine_data, invoke, quick_args, read_json

from cdft_core.config import RunConfig
from cdft_core.models.model import build_model
from cdft_core.strategy import apply_stage, build_strategy
from cdft_core.training.loaders import RunLoaders, SeededAugmentation, make_loader
from cdft_core.training.optimizer import build_optimizer
from cdft_core.training.speed import (
    COMPILE_BACKEND_ENV,
    PREFETCH_FACTOR,
    compile_model,
    configure_backends,
    describe,
    is_convolutional,
    loader_kwargs,
    match_state_layout,
    optimizer_kwargs,
    to_device,
    use_channels_last,
    with_implementation,
)


def _model(backbone: str = "test_vit", adapter: str = "none"):
    torch.manual_seed(0)
    return build_model(backbone, adapter, 3, pretrained=False, image_size=32)


# -- decisions ------------------------------------------------------------------------------
@pytest.mark.parametrize(("backbone", "conv"), [("test_vit", False), ("test_convnext", True), ("test_resnet", True)])
def test_channels_last_only_for_convolutional_backbones_on_cuda(backbone, conv):
    model = _model(backbone)
    assert is_convolutional(model.backbone) is conv
    assert use_channels_last(model.backbone, "cuda") is conv
    assert use_channels_last(model.backbone, torch.device("cuda", 1)) is conv
    assert use_channels_last(model.backbone, "cpu") is False  # CPU results stay as they were


def test_to_device_makes_only_image_batches_nhwc():
    images, features = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 16)
    assert to_device(images, "cpu", True).is_contiguous(memory_format=torch.channels_last)
    assert to_device(images, "cpu", False).is_contiguous()  # as it came
    assert torch.equal(to_device(features, "cpu", True), features)  # stored features: no NHWC for 3-D


def test_optimizer_kwargs_fused_on_cuda_default_on_cpu():
    assert optimizer_kwargs("cpu", torch.optim.Adam) == {} and optimizer_kwargs("cpu", torch.optim.AdamW) == {}
    assert optimizer_kwargs("cuda", torch.optim.Adam) == {"fused": True}
    assert optimizer_kwargs(torch.device("cuda", 0), torch.optim.AdamW) == {"fused": True}

    class NoFused(torch.optim.Optimizer):  # an optimizer without a fused kernel gets foreach
        def __init__(self, params, lr=1e-3, foreach=None):
            super().__init__(params, {"lr": lr, "foreach": foreach})

    assert optimizer_kwargs("cuda", NoFused) == {"foreach": True}


def test_loader_kwargs_by_device_and_workers():
    assert loader_kwargs("cpu", 0) == {"pin_memory": False, "persistent_workers": False}
    assert loader_kwargs("cuda", 0) == {"pin_memory": True, "persistent_workers": False}
    assert loader_kwargs("cpu", 2) == {"pin_memory": False, "persistent_workers": True,
                                       "prefetch_factor": PREFETCH_FACTOR}
    assert loader_kwargs("cuda", 2, persistent=False) == {"pin_memory": True, "persistent_workers": False,
                                                          "prefetch_factor": PREFETCH_FACTOR}
    assert loader_kwargs(None, 0)["pin_memory"] == torch.cuda.is_available()
    loader = make_loader(list(range(4)), [0, 1, 2, 3], 2, 0, 0, device="cpu", persistent=True)
    assert not loader.pin_memory and not loader.persistent_workers  # no workers: nothing to keep


def test_backends_and_description():
    before = torch.backends.cudnn.benchmark
    configure_backends("cpu")
    assert torch.backends.cudnn.benchmark == before  # untouched on CPU
    try:
        configure_backends("cuda")  # only sets a flag: safe without a GPU
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before
    assert describe("cpu", channels_last=False, optimizer_cls=torch.optim.Adam, workers=0,
                    compiled=False) == "eager, as on any CPU"
    assert describe("cpu", channels_last=False, optimizer_cls=torch.optim.Adam, workers=0, compiled=True,
                    compile_mode="max-autotune").endswith(", mode max-autotune)")
    text = describe("cuda", channels_last=True, optimizer_cls=torch.optim.AdamW, workers=4, compiled=True)
    for part in ("cuDNN autotuning", "channels_last", "fused AdamW", "pinned memory", "persistent loader workers",
                 "torch.compile"):
        assert part in text


# -- optimizer states ---------------------------------------------------------------------------
def _labelled(strategy: str = "full"):
    model = _model()
    stage = build_strategy(strategy).stages[0]
    return model, stage, apply_stage(model, stage)


def _train_a_step(model, optimizer):
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_cpu_optimizer_is_torch_default_and_resumes_a_fused_state():
    model, stage, labels = _labelled()
    optimizer = build_optimizer(model, labels, stage, RunConfig())
    assert {(g["fused"], g["foreach"]) for g in optimizer.param_groups} == {(None, None)}  # as before this change

    # a state saved by a fused (CUDA) run: same tensors, its switches say fused
    fused = torch.optim.Adam([p for g in optimizer.param_groups for p in g["params"]], lr=1e-3, fused=True)
    _train_a_step(model, fused)
    saved = fused.state_dict()
    saved["param_groups"] = [{**g, **{k: v for k, v in optimizer.state_dict()["param_groups"][0].items()
                                      if k not in ("params", "fused", "foreach")}} for g in saved["param_groups"]]
    assert saved["param_groups"][0]["fused"] is True
    resumed = build_optimizer(model, labels, stage, RunConfig(), saved)
    assert {(g["fused"], g["foreach"]) for g in resumed.param_groups} == {(None, None)}  # this run's implementation
    first = resumed.param_groups[0]["params"][0]
    assert torch.equal(resumed.state[first]["exp_avg"], fused.state[first]["exp_avg"])
    _train_a_step(model, resumed)  # and it steps


def test_with_implementation_replaces_only_the_switches():
    state = {"state": {0: {"step": torch.tensor(3.0)}},
             "param_groups": [{"params": [0], "lr": 0.1, "fused": None, "foreach": None, "label": "x"}]}
    out = with_implementation(state, {"fused": True})
    assert out["param_groups"] == [{"params": [0], "lr": 0.1, "fused": True, "foreach": None, "label": "x"}]
    assert out["state"] is state["state"] and state["param_groups"][0]["fused"] is None  # the input is not changed


def test_match_state_layout_gives_moments_the_parameter_layout():
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(conv.parameters())
    conv(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    for entry in saved["state"].values():  # resume states are written contiguous
        entry["exp_avg"] = entry["exp_avg"].contiguous()
    fresh = torch.optim.Adam(conv.parameters())
    fresh.load_state_dict(saved)
    assert fresh.state[conv.weight]["exp_avg"].stride() != conv.weight.stride()
    match_state_layout(fresh)
    for param in conv.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert fresh.state[param][key].stride() == param.stride()
            assert torch.equal(fresh.state[param][key], optimizer.state[param][key])


# -- persistent workers: the epoch travels with each key ---------------------------------------
class _Noise(torch.utils.data.Dataset):
    """An 'augmentation' that is nothing but the RNG: any seeding mistake shows."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.rand(3), index


def test_epoch_keys_seed_like_the_epoch_attribute():
    data = SeededAugmentation(_Noise(), seed=5)
    data.epoch = 2
    expected = data[4][0]
    data.epoch = 0  # stale, as in a persistent worker's copy
    assert torch.equal(data[(2, 4)][0], expected)
    assert not torch.equal(data[(1, 4)][0], expected)


def test_seeding_an_item_draws_torch_manual_seeds_numbers_and_leaves_cuda_alone(monkeypatch):
    """Only the CPU generator is seeded: the same numbers as ``torch.manual_seed``, while
    CUDA's generators (dropout on the GPU) are never reseeded per item."""
    from cdft_core.training.schedule import derive_seed

    data = SeededAugmentation(_Noise(), seed=5)
    torch.manual_seed(derive_seed(5, "augment", 0, 3))
    expected = torch.rand(3)
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    assert torch.equal(data[3][0], expected)
    assert reseeded == []


def test_run_loader_reused_for_every_epoch_gives_each_epochs_images():
    data = SeededAugmentation(_Noise(), seed=5)
    loaders = RunLoaders()
    for epoch, order in ((0, [5, 0, 3, 1, 2, 4]), (1, [2, 4]), (2, [0, 1, 2, 3, 4, 5])):
        loader = loaders.train(data, order, epoch, 4, 0, 0, "cpu")
        got = torch.cat([images for images, _ in loader])
        reference = SeededAugmentation(_Noise(), seed=5)
        reference.epoch = epoch
        assert torch.equal(got, torch.stack([reference[i][0] for i in order]))
        assert loaders.train(data, order, epoch, 4, 0, 0) is loader  # one loader for the run
    loaders.close()


def test_persistent_workers_give_the_same_batches_as_none():
    # a subprocess: loader workers fork, unsafe in a test process that may have imported jax
    code = textwrap.dedent("""
        import torch
        from cdft_core.training.loaders import RunLoaders, SeededAugmentation

        class Noise(torch.utils.data.Dataset):
            def __len__(self):
                return 10
            def __getitem__(self, index):
                return torch.rand(3), index

        def epochs(workers):
            data, loaders, out = SeededAugmentation(Noise(), seed=3), RunLoaders(), []
            for epoch in range(3):
                data.epoch = 0  # the engine sets it; workers forked earlier would never see it
                loader = loaders.train(data, list(range(10))[::-1] if epoch % 2 else list(range(10)), epoch, 3,
                                       workers, 0, "cpu")
                assert loader.persistent_workers == (workers > 0)
                out.append(torch.cat([images for images, _ in loader]))
            loaders.close()
            return torch.stack(out)

        assert torch.equal(epochs(2), epochs(0))
        print("same")
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "same" in done.stdout, done.stderr


# -- --compile --------------------------------------------------------------------------------
def test_compiled_model_keeps_its_state_dict_keys(monkeypatch):
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")
    eager, compiled = _model(), compile_model(_model())
    images = torch.randn(2, 3, 32, 32)
    out = compiled(images)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert not any("_orig_mod" in key for key in compiled.state_dict())
    torch.testing.assert_close(out, eager(images))
    compiled.load_state_dict(eager.state_dict())  # checkpoints load both ways

    stage = build_strategy("full").stages[0]  # the backward through frozen-module bookkeeping too
    for model in (eager, compiled):
        apply_stage(model, stage)
        model.train()
        torch.manual_seed(1)  # the same dropout / drop-path draws
        model(images).square().sum().backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compile_mode_reaches_inductor_only(monkeypatch, backend):
    """``--compile-mode`` is inductor's: passed to it as ``mode``, and not at all to a backend
    without modes (``aot_eager`` would only warn that it ignores it)."""
    seen = []
    monkeypatch.setenv(COMPILE_BACKEND_ENV, backend)
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: seen.append(kwargs))
    model = torch.nn.Linear(2, 2)
    assert compile_model(model, "max-autotune") is model
    compile_model(model)
    expected_mode = [{"mode": "max-autotune"}] if backend == "inductor" else [{}]
    assert seen == [{"backend": backend, "dynamic": False, **expected_mode[0]}, {"backend": backend, "dynamic": False}]


@pytest.mark.slow
def test_compiled_run_matches_eager(tmp_path_factory, tmp_path):
    """A short ``--compile`` run on CPU ends with eager's metrics (within float tolerance) and
    writes checkpoints with the eager model's keys. Inductor's code differs from eager in the
    last bits (fused kernels round differently), hence a tolerance, not equality."""
    from safetensors.torch import load_file

    root, split = engine_data(tmp_path_factory)
    runs = {}
    for name, extra, env in (("eager", (), {}), ("compiled", ("--compile",), {COMPILE_BACKEND_ENV: "inductor"})):
        args = quick_args(root, split, strategy="linear", epochs=2, extra=extra + ("--output", str(tmp_path / name)))
        code, out, err = invoke(*args, env=env)
        assert code == 0, err
        runs[name] = read_json(tmp_path / name / "summary.json")
    assert "torch.compile (inductor)" in err
    eager, compiled = runs["eager"], runs["compiled"]
    for split_name in ("val", "test"):
        assert compiled[split_name]["accuracy"] == pytest.approx(eager[split_name]["accuracy"], abs=1e-9)
        assert compiled[split_name]["loss"] == pytest.approx(eager[split_name]["loss"], rel=1e-3, abs=1e-4)
    keys = [sorted(load_file(str(tmp_path / name / "stage1-linear" / "best.safetensors"))) for name in runs]
    assert keys[0] == keys[1] and not any("_orig_mod" in key for key in keys[1])
