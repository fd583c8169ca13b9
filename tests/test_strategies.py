"""Strategies as labellings: labels per built-in strategy, stages, parameter groups, checks,
frozen-means-frozen, options, and a third-party strategy (the docs' LLRD plugin)."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers_strategy import tiny_batch, tiny_model

from cdft_core.errors import UsageError
from cdft_core.registry import load_registry
from cdft_core.strategy import (
    FROZEN,
    TRAINABLE,
    Stage,
    Strategy,
    apply_stage,
    build_strategy,
    check_adapter,
    check_compatible,
    label_summary,
    labels_for,
    param_groups,
    train_all,
    train_only,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"

#: leaves (parameter tensors) of the timm backbones without their classifier
BACKBONE_LEAVES = {"test_vit": 78, "test_convnext": 99}


def _registry():
    import cdft_plugins.strategies

    return load_registry(builtins=False, entry_points=False, extra_plugins=[("strategies", cdft_plugins.strategies)])


def _strategy(name, **options):
    return build_strategy(name, options, registry=_registry())


def _leaves(summary, part, label):
    return summary.get(part, {}).get(label, {}).get("leaves", 0)


@pytest.mark.parametrize("backbone", ["test_vit", "test_convnext"])
@pytest.mark.parametrize(
    ("name", "adapter", "trains"),
    [("linear", "none", {"head"}), ("full", "none", {"backbone", "head"}), ("frt", "cdtm", {"adapter", "head"})],
)
def test_labels_of_single_stage_builtins(backbone, name, adapter, trains):
    strategy = _strategy(name)
    assert strategy.default_adapter == adapter and len(strategy.stages) == 1
    model = tiny_model(backbone, adapter)
    check_compatible(strategy, model)
    labels = apply_stage(model, strategy.stages[0])
    summary = label_summary(model, labels)

    # which modules train, and how many leaves: the whole module, never a part of it
    trained = {part for part, cells in summary.items() if TRAINABLE in cells}
    assert trained == trains
    for part, cells in summary.items():
        assert len(cells) == 1, (part, cells)  # each built-in treats a module as a whole
    assert _leaves(summary, "backbone", TRAINABLE if "backbone" in trains else FROZEN) == BACKBONE_LEAVES[backbone]
    assert _leaves(summary, "head", TRAINABLE) == 2  # weight and bias
    if adapter != "none":
        assert _leaves(summary, "adapter", TRAINABLE) > 0
    assert "adapter" not in summary or adapter != "none"

    # requires_grad follows the labels, and the model knows when its backbone is frozen
    assert all(p.requires_grad == (labels[n] != FROZEN) for n, p in model.named_parameters())
    assert model.backbone_frozen == ("backbone" not in trains)
    model.train()
    assert model.backbone.training == ("backbone" in trains)  # a frozen backbone stays in eval mode


def test_staged_is_frt_then_everything_from_the_best_weights_at_a_tenth():
    strategy = _strategy("staged")
    assert strategy.default_adapter == "cdtm" and strategy.requires_adapter
    first, second = strategy.stages
    assert (first.name, first.init, first.lr_factor, first.epochs) == ("frt", "start", 1.0, None)
    assert (second.name, second.init, second.lr_factor, second.epochs) == ("full", "best", 0.1, None)

    model = tiny_model("test_vit", "cdtm")
    check_compatible(strategy, model)
    labels_1 = apply_stage(model, first)
    assert model.backbone_frozen
    assert label_summary(model, labels_1)["backbone"] == {FROZEN: {"leaves": 78, "numel": sum(p.numel() for p in model.backbone.parameters())}}
    assert label_summary(model, labels_1)["adapter"].keys() == {TRAINABLE}

    labels_2 = apply_stage(model, second)
    assert set(labels_2.values()) == {TRAINABLE}
    assert not model.backbone_frozen
    assert all(p.requires_grad for p in model.parameters())
    groups = param_groups(model, labels_2, second, lr=1e-4, weight_decay=1e-3)
    assert len(groups) == 1 and groups[0]["lr"] == pytest.approx(1e-5) and groups[0]["lr_scale"] == pytest.approx(0.1)


def test_staged_options():
    strategy = _strategy("staged", stage_epochs="10,5", lr_factor="0.05")
    assert [s.epochs for s in strategy.stages] == [10, 5]
    assert strategy.stages[1].lr_factor == 0.05
    assert [s.epochs for s in _strategy("staged", stage_epochs="7").stages] == [7, 7]
    assert [s.epochs for s in _strategy("staged", stage_epochs=(3, 4)).stages] == [3, 4]
    for bad, message in [
        ({"stage_epochs": "1,2,3"}, "one count for both stages or two"),
        ({"stage_epochs": "x"}, "not a valid int"),
        ({"stage_epochs": "0"}, "at least 1"),
        ({"lr_factor": "0"}, "must be > 0"),
        ({"lr_factor": "fast"}, "not a valid float"),
        ({"warmup": "1"}, "does not take option.*warmup.*it takes: stage_epochs, lr_factor"),
    ]:
        with pytest.raises(UsageError, match=message):
            _strategy("staged", **bad)
    with pytest.raises(UsageError, match="takes: no options"):
        _strategy("linear", lr_factor="0.1")


def test_param_groups_hold_only_trainable_leaves_with_label_lr_scales():
    model = tiny_model("test_vit", "cdtm")
    stage = Stage(
        "two-rates",
        lambda params: {n: ("fast" if n.startswith("head.") else "slow" if n.startswith("adapter.") else FROZEN) for n in params},
        {"fast": {"lr_scale": 1.0}, "slow": {"lr_scale": 0.5, "weight_decay_scale": 0.0 + 2.0}},
        lr_factor=0.5,
    )
    labels = apply_stage(model, stage)
    groups = param_groups(model, labels, stage, lr=1e-3, weight_decay=1e-2)
    by_label = {g["label"]: g for g in groups}
    assert list(by_label) == ["slow", "fast"]  # model order: adapter before head
    assert by_label["fast"]["lr"] == pytest.approx(5e-4) and by_label["slow"]["lr"] == pytest.approx(2.5e-4)
    assert by_label["slow"]["weight_decay"] == pytest.approx(2e-2)
    assert by_label["fast"]["param_names"] == ["head.weight", "head.bias"]
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for n, p in model.named_parameters() if labels[n] != FROZEN}
    torch.optim.Adam(groups)  # torch accepts the groups as they are (param_names included)


@pytest.mark.parametrize(("name", "adapter"), [("linear", "none"), ("frt", "cdtm")])
def test_frozen_means_frozen(name, adapter):
    """A few optimiser steps: frozen tensors bit-identical, no grad, no optimiser state."""
    model = tiny_model("test_vit", adapter)
    strategy = _strategy(name)
    labels = apply_stage(model, strategy.stages[0])
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(param_groups(model, labels, strategy.stages[0], lr=1e-2, weight_decay=1e-3))
    model.train()
    for step in range(3):
        x, y = tiny_batch(seed=step)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    for n, p in model.named_parameters():
        if labels[n] == FROZEN:
            assert torch.equal(p, start[n]), n
            assert p.grad is None and p not in optimizer.state, n
        else:
            assert p in optimizer.state
    assert not torch.equal(model.head.weight, start["head.weight"])


def test_impossible_combinations_are_refused_before_any_work():
    with pytest.raises(UsageError, match=r"strategy 'frt' trains the adapter, but adapter 'none' has no parameters; use --adapter cdtm"):
        check_compatible(_strategy("frt"), tiny_model("test_vit", "none"))
    with pytest.raises(UsageError, match="strategy 'staged' trains the adapter"):
        check_compatible(_strategy("staged"), tiny_model("test_convnext", "none"))
    with pytest.raises(UsageError, match=r"strategy 'linear' keeps adapter 'cdtm' frozen at its random initialisation.*frt"):
        check_compatible(_strategy("linear"), tiny_model("test_vit", "cdtm"))
    check_compatible(_strategy("full"), tiny_model("test_vit", "cdtm"))  # sensible: everything trains
    # the same refusal from the registered adapter metadata alone, before building a model
    with pytest.raises(UsageError, match="adapter 'none' has no parameters"):
        check_adapter(_strategy("frt"), "none", registry=load_registry(entry_points=False))


def test_check_adapter_reads_the_registered_metadata():
    from cdft_core import hookimpl

    class Adapters:
        @hookimpl
        def register_adapters(self, register):
            register("plain", lambda **kw: None, metadata={"has_parameters": False})
            register("learned", lambda **kw: None, metadata={"has_parameters": True})

    registry = load_registry(builtins=False, entry_points=False, extra_plugins=[("adapters", Adapters())])
    frt = Strategy("frt", (Stage("frt", train_only("adapter", "head"), {TRAINABLE: {}}),), "learned", requires_adapter=True)
    check_adapter(frt, "learned", registry=registry)
    with pytest.raises(UsageError, match="adapter 'plain' has no parameters"):
        check_adapter(frt, "plain", registry=registry)
    check_adapter(Strategy("full", (Stage("full", train_all(), {TRAINABLE: {}}),), "none"), "plain", registry=registry)


def test_labellings_are_checked_like_optax():
    model = tiny_model("test_vit")
    typo = Stage("typo", train_only("head", label="trainabel"), {TRAINABLE: {"lr_scale": 1.0}})
    with pytest.raises(UsageError, match=r"'trainabel' have no settings; labels of the parameters: frozen, trainabel; labels with settings: frozen, trainable"):
        labels_for(model, typo)
    partial_labels = Stage("partial", lambda params: {"head.weight": TRAINABLE}, {TRAINABLE: {}})
    with pytest.raises(UsageError, match="unlabelled parameters"):
        labels_for(model, partial_labels)
    nothing = Strategy("nothing", (Stage("nothing", train_only("nowhere"), {TRAINABLE: {}}),), "none")
    with pytest.raises(UsageError, match="every parameter is frozen"):
        check_compatible(nothing, model)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Stage("s", train_all(), {FROZEN: {"lr_scale": 1.0}}), "'frozen' takes no settings"),
        (lambda: Stage("s", train_all(), {TRAINABLE: {"lr": 1.0}}), "unknown setting"),
        (lambda: Stage("s", train_all(), {TRAINABLE: {"lr_scale": 0.0}}), "must be a number > 0"),
        (lambda: Stage("s", train_all(), {TRAINABLE: {}}, init="last"), "init must be"),
        (lambda: Stage("s", train_all(), {TRAINABLE: {}}, epochs=0), "epochs must be"),
        (lambda: Strategy("x", (Stage("s", train_all(), {TRAINABLE: {}}, init="best"),), "none"), "first stage"),
        (lambda: Strategy("x", (Stage("s", train_all(), {}), Stage("s", train_all(), {})), "none"), "stage names must differ"),
        (lambda: Strategy("x", (), "none"), "at least one Stage"),
    ],
)
def test_invalid_stages_and_strategies_are_usage_errors(make, message):
    with pytest.raises(UsageError, match=message):
        make()


def test_builtins_are_registered_picklable_and_cheap_to_import():
    registry = load_registry(entry_points=False)  # the built-in plugin list
    for name, adapter in [("linear", "none"), ("full", "none"), ("frt", "cdtm"), ("staged", "cdtm")]:
        component = registry.get("strategy", name)
        assert component.provider == "strategies" and component.metadata["default_adapter"] == adapter
        strategy = component.factory()
        assert pickle.loads(pickle.dumps(strategy)).stages[0].label_fn({"head.w": 0, "backbone.w": 0}) == strategy.stages[0].label_fn(
            {"head.w": 0, "backbone.w": 0}
        )
    code = "import sys, cdft_plugins.strategies, cdft_core.strategy; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- a third-party strategy: the LLRD plugin module written out in docs/plugins.md ------
def _docs_llrd_module() -> types.ModuleType:
    text = DOCS.read_text(encoding="utf-8")
    match = re.search(r"<!-- llrd-plugin[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/plugins.md lost its llrd plugin block"
    module = types.ModuleType("cdft_llrd")
    exec(compile(match.group(1), str(DOCS), "exec"), module.__dict__)
    return module


def test_docs_llrd_plugin_labels_the_last_blocks_with_decayed_rates():
    registry = load_registry(entry_points=False, extra_plugins=[("llrd", _docs_llrd_module())])
    assert registry.get("strategy", "llrd").provider == "llrd"
    strategy = build_strategy("llrd", {"blocks": "2", "decay": "0.5"}, registry=registry)

    model = tiny_model("test_vit", "cdtm")
    check_compatible(strategy, model)
    labels = apply_stage(model, strategy.stages[0])
    block = re.compile(r"\.blocks\.(\d+)\.")
    for name, label in labels.items():
        found = block.search(name)
        if name.startswith(("adapter.", "head.")):
            assert label == "head", name
        elif found and int(found.group(1)) in (4, 5):  # test_vit has 6 blocks: the last two train
            assert label == f"last{6 - int(found.group(1))}", name
        elif re.search(r"backbone\.(model\.)?norm\.", name):
            assert label == "after_blocks", name
        else:
            assert label == FROZEN, name
    assert not model.backbone_frozen
    groups = {g["label"]: g for g in param_groups(model, labels, strategy.stages[0], lr=1e-3, weight_decay=0.0)}
    assert groups.keys() == {"last2", "last1", "after_blocks", "head"}
    assert groups["last1"]["lr"] == pytest.approx(5e-4) and groups["last2"]["lr"] == pytest.approx(2.5e-4)
    assert groups["head"]["lr"] == pytest.approx(1e-3)
    assert len(groups["last1"]["params"]) == len(groups["last2"]["params"]) == 12  # leaves of one ViT block

    with pytest.raises(UsageError, match="needs a transformer backbone"):
        check_compatible(strategy, tiny_model("test_convnext"))
    with pytest.raises(UsageError, match="only 6 blocks"):
        check_compatible(build_strategy("llrd", {"blocks": "7"}, registry=registry), model)


@pytest.mark.parametrize(("name", "adapter", "trains_norms"), [("linear", "none", False), ("full", "none", True),
                                                                 ("frt", "cdtm", False)])
def test_batchnorms_in_train_mode_are_those_a_stage_trains(name, adapter, trains_norms):
    """--accumulate's log line warns when BatchNorm layers normalise each micro-batch alone."""
    from types import SimpleNamespace

    from cdft_core.training.records import describe_effective_batch

    model = tiny_model("test_resnet", adapter)
    apply_stage(model, _strategy(name).stages[0])
    norms = model.training_batchnorms()
    model.train()
    in_train_mode = sorted(n for n, m in model.named_modules()
                           if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training)
    assert sorted(norms) == in_train_mode and bool(norms) is trains_norms
    run = SimpleNamespace(model=model, dist=SimpleNamespace(world_size=1), data=SimpleNamespace(train=[0] * 40),
                          config=SimpleNamespace(batch_size=4, accumulate=2))
    text = describe_effective_batch(run)
    assert text.startswith("8 (4 x 2 accumulated x 1 process)")
    assert ("BatchNorm layers in train mode normalise each micro-batch of 4 on its own" in text) is trains_norms
    run.config.accumulate = 1
    assert "BatchNorm" not in describe_effective_batch(run)
