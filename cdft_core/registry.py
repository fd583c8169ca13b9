"""The component registry: loads plugins one at a time, records what each registers, resolves names.

Plugins load lazily (on the first :func:`get_registry` call, inside a command), each inside
its own error capture, so one broken plugin never takes the CLI down; ``cdft plugins``
shows it with its error. The environment switches are read when loading, not at import:

- ``CDFT_PLUGINS=a,b``: load only these entry-point plugins (empty: none of them);
- ``CDFT_DISABLE_PLUGINS=a,b``: skip these plugins (entry-point or built-in);
- ``CDFT_STRICT_PLUGINS=1``: re-raise load errors (for plugin authors).

A name in either list that is not installed is an error, not silently ignored.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata as importlib_metadata
from typing import Any

import pluggy

from cdft_core import hookspecs
from cdft_core.components import Component, Metadata, PluginInfo, Resolver
from cdft_core.errors import PluginError, PluginUnavailable, UnknownComponent, UsageError
from cdft_core.text import env_flag, one_line

KINDS: tuple[str, ...] = ("dataset", "backbone", "adapter", "strategy")
PLURALS: dict[str, str] = {"dataset": "datasets", "backbone": "backbones", "adapter": "adapters", "strategy": "strategies"}
HOOKS: dict[str, str] = {
    "dataset": "register_datasets",
    "backbone": "register_backbones",
    "adapter": "register_adapters",
    "strategy": "register_strategies",
}
ENTRY_POINT_GROUP = "cdft"

#: Built-in plugins, in load order: the core registers them through the same hooks as
#: any third-party package (no private back door).
BUILTIN_PLUGINS: dict[str, str] = {
    "breakhis": "cdft_plugins.breakhis",
    "hcrf": "cdft_plugins.hcrf",
    "csv": "cdft_plugins.csv_dataset",
    "imagefolder": "cdft_plugins.imagefolder",
    "timm": "cdft_plugins.timm_backbones",
    "open_clip": "cdft_plugins.open_clip_backbones",
    "foundation": "cdft_plugins.foundation_backbones",
    "adapters": "cdft_plugins.adapters",
    "strategies": "cdft_plugins.strategies",
    "lora": "cdft_plugins.lora_strategies",
}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-/ ]*$")


class Registrar:
    """The ``register`` callable handed to a hook; records registrations for one plugin.

    Registrations are staged and committed only when every hook of the plugin has
    returned, so a plugin with a hook that raises (or clashes) registers nothing.
    """

    def __init__(self, kind: str, provider: str) -> None:
        self.kind = kind
        self.provider = provider
        self.components: list[tuple[Component, bool]] = []
        self.resolvers: list[Resolver] = []

    def __call__(
        self,
        name: str,
        factory: Callable[..., Any],
        *,
        description: str = "",
        metadata: Mapping[str, Any] | None = None,
        override: bool = False,
    ) -> None:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise PluginError(f"plugin {self.provider!r} registered an invalid {self.kind} name {name!r}: a name "
                              f"starts with a letter or digit, then letters, digits, spaces and _ . : - /")
        if not callable(factory):
            raise PluginError(f"plugin {self.provider!r}: the factory for {self.kind} {name!r} is not callable")
        component = Component(
            name=name,
            kind=self.kind,
            factory=factory,
            description=one_line(description),
            provider=self.provider,
            metadata=Metadata(metadata),
        )
        self.components.append((component, override))

    def resolver(
        self,
        claim: Callable[[str], Mapping[str, Any] | None],
        *,
        catalogue: Callable[[], Iterable[str]] | None = None,
        description: str = "",
    ) -> None:
        """Claim an open-ended family of names (tried after exact matches, in load order)."""
        self.resolvers.append(Resolver(self.kind, self.provider, claim, catalogue, one_line(description)))


class Registry:
    """Components by kind and name, the resolvers, and the load report of every plugin."""

    def __init__(self) -> None:
        self.components: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}
        self._overrides: dict[tuple[str, str], bool] = {}
        self.resolvers: dict[str, list[Resolver]] = {kind: [] for kind in KINDS}
        self.plugins: list[PluginInfo] = []

    # -- building -------------------------------------------------------------------
    def stage(self, registrar: Registrar, staged: dict[tuple[str, str], tuple[Component, bool]]) -> None:
        """Check one hook call's registrations against the registry and ``staged`` (the
        plugin's earlier hook calls) and add them to ``staged``; a clash raises."""
        table = self.components[registrar.kind]
        for component, override in registrar.components:
            key = (component.kind, component.name)
            old, old_override = staged.get(key, (table.get(component.name), self._overrides.get(key, False)))
            if old is not None:
                if override and not old_override:
                    pass  # documented rule: an explicit override wins
                elif old_override and not override:
                    continue  # the earlier explicit override stays
                elif override:
                    raise PluginError(
                        f"{component.kind} {component.name!r} is overridden (override=True) by both plugin "
                        f"{old.provider!r} and plugin {component.provider!r}; only one may override it: drop "
                        f"override=True from one, or disable one with CDFT_DISABLE_PLUGINS")
                else:
                    raise PluginError(
                        f"{component.kind} {component.name!r} is registered by both plugin {old.provider!r} and plugin "
                        f"{component.provider!r}; rename one, or pass override=True in the plugin that should win")
            staged[key] = (component, override)

    def commit(self, staged: Mapping[tuple[str, str], tuple[Component, bool]], registrars: Iterable[Registrar]) -> None:
        """Add what :meth:`stage` checked for one plugin, and the resolvers of its hook calls."""
        for (kind, name), (component, override) in staged.items():
            self.components[kind][name] = component
            self._overrides[(kind, name)] = override
        for registrar in registrars:
            self.resolvers[registrar.kind].extend(registrar.resolvers)

    # -- queries --------------------------------------------------------------------
    def get(self, kind: str, name: str) -> Component:
        """Resolve a name: exact match, then resolvers, else a "did you mean" usage error."""
        kind = normalise_kind(kind)
        table = self.components[kind]
        if name in table:
            return table[name]
        for resolver in self.resolvers[kind]:
            try:
                claimed = resolver.claim(name)
            except UsageError:
                raise
            except Exception as exc:  # a resolver bug must still be one clear line
                raise PluginError(f"plugin {resolver.provider!r} failed while resolving {kind} {name!r}: {exc}") from exc
            if claimed:
                return Component(
                    name=claimed.get("name", name),
                    kind=kind,
                    factory=claimed["factory"],
                    description=one_line(claimed.get("description", resolver.description)),
                    provider=resolver.provider,
                    metadata=Metadata(claimed.get("metadata", {})),
                )
        raise UnknownComponent(self._unknown_message(kind, name), kind, name)

    def list(self, kind: str | None = None, pattern: str | None = None, include_all: bool = False) -> list[Component]:
        """Curated components (plus resolver catalogues with ``include_all`` or a pattern)."""
        kinds = [normalise_kind(kind)] if kind else list(KINDS)
        out: list[Component] = []
        for k in kinds:
            rows = dict(self.components[k])
            if include_all or pattern:
                for resolver in self.resolvers[k]:
                    for name in self._catalogue(resolver):
                        if name not in rows and (pattern is None or fnmatch.fnmatchcase(name, pattern)):
                            rows[name] = Component(name, k, _unresolved, resolver.description, resolver.provider, Metadata({"catalogue": True}))
            for name in sorted(rows, key=_natural_key):
                if pattern is None or fnmatch.fnmatchcase(name, pattern):
                    out.append(rows[name])
        return out

    def plugin(self, name: str) -> PluginInfo | None:
        return next((p for p in self.plugins if p.name == name), None)

    def provenance(self, kind: str, name: str) -> dict[str, str]:
        """The component ``name`` resolves to, the plugin that registered it and that plugin's
        distribution and version: what a run records so that a machine lacking a third-party
        plugin can say which package to install."""
        component = self.get(kind, name)
        info = self.plugin(component.provider)
        return {"name": component.name, "plugin": component.provider,
                "distribution": info.distribution if info else "?", "version": info.version if info else "?"}

    def problems(self) -> list[PluginInfo]:
        """Plugins that failed to load (not the merely unavailable ones)."""
        return [p for p in self.plugins if p.status == "broken"]

    def _catalogue(self, resolver: Resolver) -> list[str]:
        if resolver.catalogue is None:
            return []
        try:
            return list(resolver.catalogue())
        except Exception as exc:
            raise PluginError(f"plugin {resolver.provider!r} failed to list its catalogue: {exc}") from exc

    def _unknown_message(self, kind: str, name: str) -> str:
        known = list(self.components[kind])
        try:
            for resolver in self.resolvers[kind]:
                known.extend(self._catalogue(resolver))
        except PluginError:
            pass
        known = [k for k in dict.fromkeys(known) if k != name]  # each name once
        same_but_case = [k for k in known if k.lower() == name.lower()]  # --strategy LoRA
        close = same_but_case or difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        message = f"unknown {kind} {name!r}"
        if close:
            message += "; did you mean " + ", ".join(repr(c) for c in close) + "?"
        else:
            more = " --all" if self.resolvers[kind] else ""
            message += f"; see `cdft list {PLURALS[kind]}{more}`"
        for info in self.plugins:  # only those that may provide this kind (hooks unknown: may)
            if info.status != "ok" and (not info.hooks or HOOKS[kind] in info.hooks):
                state = "is unavailable" if info.status == "unavailable" else "failed to load"
                message += f" (plugin {info.name!r} {state}: {info.error})"
        return message


# -- loading ------------------------------------------------------------------------
_REGISTRY: Registry | None = None


def get_registry(*, strict: bool | None = None) -> Registry:
    """The process-wide registry, built on first use. ``strict=False`` (``cdft plugins``,
    which reports broken plugins) never re-raises; a registry loaded so is not cached."""
    global _REGISTRY
    if _REGISTRY is None and strict is False:
        return load_registry(strict=False)
    _REGISTRY = _REGISTRY or load_registry()
    return _REGISTRY


def use_registry(registry: Registry | None) -> None:
    """Make ``registry`` the process-wide one that runs, evaluation and the CLI resolve names in
    (a test's in-process plugins: ``use_registry(load_registry(extra_plugins=[...]))``); None
    forgets it, as :func:`reset_registry` does."""
    global _REGISTRY
    _REGISTRY = registry


def reset_registry() -> None:
    """Forget the cached registry (tests, and code that changes the environment switches)."""
    global _REGISTRY
    _REGISTRY = None


def load_registry(*, builtins: bool = True, entry_points: bool = True,
                  extra_plugins: Iterable[tuple[str, object]] = (), strict: bool | None = None) -> Registry:
    """Build a registry: built-in plugins, then entry points, then ``extra_plugins``.

    ``extra_plugins`` are ``(name, module_or_object)`` pairs registered in-process (tests);
    each replaces an installed entry point of the same name or the same module.
    """
    if strict is None:
        strict = env_flag("CDFT_STRICT_PLUGINS")
    disabled = _env_list("CDFT_DISABLE_PLUGINS")
    only = _env_list("CDFT_PLUGINS")
    registry = Registry()
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)

    from cdft_core import __version__

    candidates: list[tuple[PluginInfo, Callable[[], object]]] = []
    if builtins:
        for name, module in BUILTIN_PLUGINS.items():
            info = PluginInfo(name, "cdft", __version__, builtin=True)
            candidates.append((info, lambda module=module: importlib.import_module(module)))
    eps = list(importlib_metadata.entry_points(group=ENTRY_POINT_GROUP)) if entry_points else []
    ep_names = {ep.name for ep in eps}
    extras = list(extra_plugins)
    known = ep_names | (set(BUILTIN_PLUGINS) if builtins else set())
    for label, names, pool in (("CDFT_PLUGINS", only, ep_names), ("CDFT_DISABLE_PLUGINS", disabled, known)):
        missing = sorted((names or set()) - pool)
        if missing:
            raise UsageError(
                f"{label} names plugin(s) that are not installed: {', '.join(missing)}; "
                f"installed entry-point plugins: {', '.join(sorted(ep_names)) or 'none'}"
            )
    for ep in eps:
        if (only is not None and ep.name not in only) or any(_same_plugin(ep, n, obj) for n, obj in extras):
            continue
        dist = getattr(ep, "dist", None)
        dist_name, version = (dist.metadata["Name"], dist.version) if dist is not None else ("?", "?")
        candidates.append((PluginInfo(ep.name, dist_name, version, builtin=False), ep.load))
    for name, obj in extras:
        info = PluginInfo(name, getattr(obj, "__name__", type(obj).__name__), "", builtin=False)
        candidates.append((info, lambda obj=obj: obj))

    for info, load in candidates:
        if info.name in (disabled or set()):
            continue
        taken = next((p for p in registry.plugins if p.name == info.name), None)
        registry.plugins.append(info)
        if taken is not None:  # pluggy would refuse it with a repr of every plugin module
            _fail(info, PluginError(f"its plugin name {info.name!r} is already taken by the plugin from "
                                    f"{taken.distribution}; rename the entry point in {info.distribution}'s "
                                    f"[project.entry-points.cdft]"), "while loading", strict)
            continue
        _load_one(pm, registry, info, load, strict)
    return registry


def _load_one(pm: pluggy.PluginManager, registry: Registry, info: PluginInfo, load: Callable[[], object], strict: bool) -> None:
    """Load one plugin and run its hooks; commit what they register only if all succeed."""
    where = "while loading"
    try:
        plugin = load()
        pm.register(plugin, name=info.name)
        info.hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        staged: dict[tuple[str, str], tuple[Component, bool]] = {}
        registrars: list[Registrar] = []
        for kind in KINDS:
            for impl in getattr(pm.hook, HOOKS[kind]).get_hookimpls():
                if impl.plugin is plugin:
                    where, registrar = f"in {HOOKS[kind]}", Registrar(kind, info.name)
                    impl.function(**{arg: registrar for arg in impl.argnames})
                    registry.stage(registrar, staged)
                    registrars.append(registrar)
        registry.commit(staged, registrars)
    except PluginUnavailable as exc:
        info.status, info.error = "unavailable", one_line(str(exc))
    except Exception as exc:
        _fail(info, exc, where, strict)


def _fail(info: PluginInfo, exc: Exception, where: str, strict: bool) -> None:
    """Mark ``info`` broken with a one-line error saying where it failed (re-raised when strict).

    The whole plugin is dropped, not just the hook that failed: its components may depend on
    each other (a strategy on its adapter), so half a plugin is never registered.
    """
    info.status = "broken"
    error = one_line(f"{type(exc).__name__}: {exc}" if not isinstance(exc, PluginError) else str(exc))
    info.error = error if where == "while loading" else f"{where}: {error}"
    if strict:
        raise PluginError(f"plugin {info.name!r} failed {where}: {error}") from exc


def _same_plugin(ep: Any, name: str, obj: object) -> bool:
    """Whether the in-process plugin ``(name, obj)`` is the entry point ``ep`` (same name or module)."""
    if ep.name == name or (not ep.attr and getattr(obj, "__name__", None) == ep.module):
        return True
    target = sys.modules.get(ep.module)  # never imports: an object can only come from a loaded module
    for part in filter(None, (ep.attr or "").split(".")):
        target = getattr(target, part, None)
    return target is obj


def normalise_kind(kind: str) -> str:
    """Accept ``dataset``/``datasets`` etc.; anything else is a usage error."""
    k = (kind or "").lower()
    k = {plural: singular for singular, plural in PLURALS.items()}.get(k, k)
    if k not in KINDS:
        raise UsageError(f"unknown component kind {kind!r}; choose from: {', '.join(PLURALS.values())}")
    return k


def _env_list(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _unresolved(*args: Any, **kwargs: Any) -> Any:
    raise UsageError("a catalogue entry must be resolved by name before it is built")
