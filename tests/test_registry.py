"""The registry: registration, clashes, overrides, resolvers, isolation of broken plugins."""

from __future__ import annotations

import types

import pytest

from cdft_core import Lazy, hookimpl
from cdft_core.errors import PluginError, PluginUnavailable, UsageError
from cdft_core.registry import load_registry, normalise_kind


def plugin(**hooks):
    """An in-process plugin object whose hooks are the given functions."""
    ns = types.SimpleNamespace()
    for name, fn in hooks.items():
        setattr(ns, name, hookimpl(fn))
    return ns


def datasets(*names, override=False):
    def register_datasets(register):
        for name in names:
            register(name, dict, description=f"the {name} data", metadata={"classes": ["a", "b"]}, override=override)

    return register_datasets


def registry_of(*plugins, strict=False):
    return load_registry(builtins=False, entry_points=False, extra_plugins=list(plugins), strict=strict)


def test_registered_component_carries_its_facts():
    reg = registry_of(("alpha", plugin(register_datasets=datasets("tiles"))))
    comp = reg.get("dataset", "tiles")
    assert (comp.name, comp.kind, comp.provider, comp.description) == ("tiles", "dataset", "alpha", "the tiles data")
    assert comp.metadata["classes"] == ["a", "b"]
    assert comp.factory is dict
    assert reg.plugin("alpha").hooks == ["register_datasets"]
    assert comp.to_json()["metadata"] == {"classes": ["a", "b"]}


def test_duplicate_across_plugins_names_both_and_never_is_silent():
    reg = registry_of(
        ("alpha", plugin(register_datasets=datasets("tiles"))),
        ("beta", plugin(register_datasets=datasets("tiles", "other"))),
    )
    beta = reg.plugin("beta")
    assert beta.status == "broken"
    assert "'alpha'" in beta.error and "'beta'" in beta.error and "tiles" in beta.error
    assert reg.get("dataset", "tiles").provider == "alpha"
    # the clashing hook registered nothing at all (atomic per hook call)
    with pytest.raises(UsageError):
        reg.get("dataset", "other")


def test_duplicate_raises_in_strict_mode():
    with pytest.raises(PluginError, match="'alpha'.*'beta'"):
        registry_of(
            ("alpha", plugin(register_datasets=datasets("tiles"))),
            ("beta", plugin(register_datasets=datasets("tiles"))),
            strict=True,
        )


@pytest.mark.parametrize("order", ["override-last", "override-first"])
def test_explicit_override_wins_whatever_the_order(order):
    plain = ("alpha", plugin(register_datasets=datasets("tiles")))
    over = ("beta", plugin(register_datasets=datasets("tiles", override=True)))
    plugins = [plain, over] if order == "override-last" else [over, plain]
    reg = registry_of(*plugins)
    assert reg.get("dataset", "tiles").provider == "beta"
    assert not reg.problems()


def test_two_overrides_still_clash():
    reg = registry_of(
        ("alpha", plugin(register_datasets=datasets("tiles", override=True))),
        ("beta", plugin(register_datasets=datasets("tiles", override=True))),
    )
    assert reg.plugin("beta").status == "broken"
    assert "overridden (override=True) by both plugin 'alpha' and plugin 'beta'; only one may override it" \
        in reg.plugin("beta").error  # not "pass override=True": both did


def test_a_second_plugin_of_the_same_name_gets_one_line_not_pluggys_repr():
    reg = registry_of(("alpha", plugin(register_datasets=datasets("tiles"))),
                      ("alpha", plugin(register_datasets=datasets("other"))))
    first, second = reg.plugins
    assert first.status == "ok" and second.status == "broken"
    assert second.error.startswith("its plugin name 'alpha' is already taken by the plugin from ")
    assert "rename the entry point" in second.error and "<module" not in second.error
    assert [c.name for c in reg.list("datasets")] == ["tiles"]
    with pytest.raises(PluginError, match=r"^plugin 'alpha' failed while loading: its plugin name 'alpha' is already taken"):
        registry_of(("alpha", plugin()), ("alpha", plugin()), strict=True)


def test_unknown_name_mentions_a_broken_plugin_of_its_kind():
    """``cdft run --strategy mine`` whose plugin failed says so: commands other than list,
    show and prepare print no load warnings, so the unknown-name error is where it shows."""
    def register_strategies(register):
        raise ValueError("unknown setting 'lr_scal'")

    reg = registry_of(("mine", plugin(register_strategies=register_strategies)))
    with pytest.raises(UsageError, match=r"unknown strategy 's-missing'.*\(plugin 'mine' failed to load: in "
                                         r"register_strategies: ValueError: unknown setting 'lr_scal'\)"):
        reg.get("strategy", "s-missing")
    with pytest.raises(UsageError) as caught:
        reg.get("dataset", "nothing")
    assert "mine" not in str(caught.value)  # it provides no datasets


def test_hook_raising_is_isolated():
    def register_backbones(register):
        register("half", dict, description="registered before the failure")
        raise RuntimeError("boom in hook")

    reg = registry_of(
        ("bad", plugin(register_backbones=register_backbones)),
        ("good", plugin(register_datasets=datasets("tiles"))),
    )
    bad = reg.plugin("bad")
    assert bad.status == "broken" and bad.error == "in register_backbones: RuntimeError: boom in hook"
    assert reg.get("dataset", "tiles").provider == "good"
    with pytest.raises(UsageError):
        reg.get("backbone", "half")


def test_unavailable_plugin_is_not_broken_and_is_mentioned_on_unknown_names():
    def register_backbones(register):
        raise PluginUnavailable("needs open_clip: pip install 'cdft[open_clip]'")

    reg = registry_of(("clipper", plugin(register_backbones=register_backbones)))
    info = reg.plugin("clipper")
    assert info.status == "unavailable" and "cdft[open_clip]" in info.error
    assert reg.problems() == []
    with pytest.raises(UsageError, match="clipper.*unavailable"):
        reg.get("backbone", "anything")


def test_resolver_claims_names_after_exact_matches_and_lists_catalogue():
    def register_backbones(register):
        register("net.curated", dict, description="curated")
        register.resolver(
            lambda name: {"factory": list, "metadata": {"claimed": name}} if name.startswith("net") else None,
            catalogue=lambda: ["net.a", "net.b2", "net.b10", "net.curated"],
            description="any net",
        )

    reg = registry_of(("nets", plugin(register_backbones=register_backbones)))
    assert reg.get("backbone", "net.curated").factory is dict
    claimed = reg.get("backbone", "net.zzz")
    assert claimed.factory is list and claimed.metadata == {"claimed": "net.zzz"} and claimed.provider == "nets"
    assert [c.name for c in reg.list("backbones")] == ["net.curated"]
    assert [c.name for c in reg.list("backbones", include_all=True)] == ["net.a", "net.b2", "net.b10", "net.curated"]
    assert [c.name for c in reg.list("backbones", "net.b*")] == ["net.b2", "net.b10"]


def test_unknown_name_suggests_close_matches():
    reg = registry_of(("alpha", plugin(register_datasets=datasets("breakhis", "hcrf"))))
    with pytest.raises(UsageError, match=r"unknown dataset 'breakhs'; did you mean 'breakhis'\?"):
        reg.get("dataset", "breakhs")
    with pytest.raises(UsageError, match="see `cdft list datasets`$"):
        reg.get("dataset", "zzzzzz")


def test_unknown_name_of_an_open_ended_kind_points_at_the_catalogue():
    def register_backbones(register):
        register.resolver(lambda name: None, catalogue=lambda: ["net.a"])

    reg = registry_of(("nets", plugin(register_backbones=register_backbones)))
    with pytest.raises(UsageError, match="see `cdft list backbones --all`"):
        reg.get("backbone", "zzzzzzzz")


def test_invalid_registrations_are_plugin_errors():
    def register_strategies(register):
        register("ok name", "not callable")

    reg = registry_of(("x", plugin(register_strategies=register_strategies)))
    assert "not callable" in reg.plugin("x").error
    reg = registry_of(("y", plugin(register_strategies=lambda register: register("bad name!", dict))))
    assert reg.plugin("y").error.endswith("invalid strategy name 'bad name!': a name starts with a letter or digit, "
                                          "then letters, digits, spaces and _ . : - /")


def test_kind_names():
    assert normalise_kind("strategies") == "strategy"
    assert normalise_kind("Backbones") == "backbone"
    with pytest.raises(UsageError, match="datasets, backbones, adapters, strategies"):
        normalise_kind("models")


def test_environment_switches_name_only_installed_plugins(monkeypatch):
    monkeypatch.setenv("CDFT_DISABLE_PLUGINS", "no-such-plugin")
    with pytest.raises(UsageError, match="no-such-plugin"):
        load_registry(builtins=False)
    monkeypatch.delenv("CDFT_DISABLE_PLUGINS")
    monkeypatch.setenv("CDFT_PLUGINS", "no-such-plugin")
    with pytest.raises(UsageError, match="CDFT_PLUGINS.*no-such-plugin"):
        load_registry(builtins=False)


def test_lazy_metadata_is_computed_only_when_read():
    calls = []

    def expensive():
        calls.append(1)
        return {"mean": (0.5, 0.5, 0.5)}

    def register_backbones(register):
        register("net", dict, description="d", metadata={"family": "vit", "data_config": Lazy(expensive)})

    reg = registry_of(("nets", plugin(register_backbones=register_backbones)))
    comp = reg.get("backbone", "net")
    assert comp.metadata["family"] == "vit" and calls == []
    assert comp.metadata["data_config"] == {"mean": (0.5, 0.5, 0.5)}
    assert comp.to_json()["metadata"]["data_config"] == {"mean": [0.5, 0.5, 0.5]}
    assert calls == [1]


# -- a plugin registers all or nothing ------------------------------------------------
def test_a_plugin_whose_later_hook_raises_registers_nothing():
    def register_strategies(register):
        register("half-strategy", dict, description="registered before the failure")
        raise RuntimeError("no strategies today")

    reg = registry_of(
        ("bad", plugin(register_datasets=datasets("bad-tiles"), register_strategies=register_strategies)),
        ("good", plugin(register_datasets=datasets("tiles"))),
    )
    bad = reg.plugin("bad")
    assert bad.status == "broken" and bad.error == "in register_strategies: RuntimeError: no strategies today"
    assert bad.hooks == ["register_datasets", "register_strategies"]
    assert [p.name for p in reg.problems()] == ["bad"]
    assert [c.name for c in reg.list("datasets")] == ["tiles"]  # bad-tiles was committed by no one
    for kind, name in (("dataset", "bad-tiles"), ("strategy", "half-strategy")):
        with pytest.raises(UsageError):
            reg.get(kind, name)


def test_a_clash_in_a_later_hook_drops_the_earlier_hooks_and_resolvers():
    def register_backbones(register):
        register.resolver(lambda name: {"factory": dict}, catalogue=lambda: ["anything"])

    reg = registry_of(
        ("alpha", plugin(register_strategies=lambda register: register("probe", dict))),
        ("beta", plugin(register_datasets=datasets("beta-tiles"), register_backbones=register_backbones,
                        register_strategies=lambda register: register("probe", dict))),
    )
    assert reg.plugin("beta").status == "broken" and "'alpha'" in reg.plugin("beta").error
    assert reg.resolvers["backbone"] == [] and reg.list("datasets") == []
    assert reg.get("strategy", "probe").provider == "alpha"


def test_an_unavailable_plugin_registers_nothing_either():
    def register_backbones(register):
        raise PluginUnavailable("needs open_clip: pip install 'cdft[open_clip]'")

    reg = registry_of(("clipper", plugin(register_datasets=datasets("clip-tiles"), register_backbones=register_backbones)))
    assert reg.plugin("clipper").status == "unavailable" and reg.list("datasets") == []


def test_strict_mode_names_the_plugin_the_hook_and_the_reason():
    def register_strategies(register):
        raise RuntimeError("no strategies\ntoday")

    with pytest.raises(PluginError) as caught:
        registry_of(
            ("good", plugin(register_datasets=datasets("tiles"))),
            ("bad", plugin(register_datasets=datasets("bad-tiles"), register_strategies=register_strategies)),
            strict=True,
        )
    assert str(caught.value) == "plugin 'bad' failed in register_strategies: RuntimeError: no strategies today"
    with pytest.raises(PluginError, match=r"^plugin 'beta' failed in register_datasets: dataset 'tiles' .*'alpha'"):
        registry_of(
            ("alpha", plugin(register_datasets=datasets("tiles"))),
            ("beta", plugin(register_datasets=datasets("tiles"))),
            strict=True,
        )


# -- unknown names: each suggestion once, only related notes --------------------------
def test_unknown_name_suggests_each_name_once():
    def register_backbones(register):
        register("net.alpha", dict)
        register.resolver(lambda name: None, catalogue=lambda: ["net.alpha", "net.alpha", "net.alphb"])

    reg = registry_of(("nets", plugin(register_backbones=register_backbones)))
    with pytest.raises(UsageError) as caught:
        reg.get("backbone", "net.alphx")
    message = str(caught.value)
    assert message.startswith("unknown backbone 'net.alphx'; did you mean ")
    assert message.count("'net.alpha'") == 1 and message.count("'net.alphb'") == 1


def test_unknown_name_mentions_only_unavailable_plugins_of_its_kind():
    def register_backbones(register):
        raise PluginUnavailable("needs open_clip: pip install 'cdft[open_clip]'")

    reg = registry_of(
        ("clipper", plugin(register_backbones=register_backbones)),
        ("alpha", plugin(register_datasets=datasets("breakhis"))),
    )
    with pytest.raises(UsageError) as caught:
        reg.get("dataset", "breakhs")
    assert str(caught.value) == "unknown dataset 'breakhs'; did you mean 'breakhis'?"
    with pytest.raises(UsageError, match=r"unknown backbone 'zzzz'.*\(plugin 'clipper' is unavailable: needs open_clip"):
        reg.get("backbone", "zzzz")
