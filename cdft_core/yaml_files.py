"""YAML the way cdft reads and writes it: safe, bounded, without anchors or aliases.

Config presets, saved ``config.yaml`` files and ``KEY=VALUE`` option values all come
through here. Safe loading alone is not enough: anchors and aliases (``&a`` / ``*a``) let
a few lines expand to gigabytes ("billion laughs"), so they are refused before they are
composed, and so are files over :data:`MAX_CONFIG_BYTES`. A key given twice in one mapping
is refused too: plain ``safe_load`` keeps the last silently, so a preset could say
``epochs: 1`` and run with ``epochs: 2`` further down. What cdft writes never uses
anchors or repeats a key, so it always reads back. Imports no torch.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from cdft_core.errors import UsageError
from cdft_core.text import one_line

#: The largest config file cdft reads: presets and saved configurations are a few KiB.
MAX_CONFIG_BYTES = 1 << 20


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML preset; it must be a mapping of config keys.

    Safe YAML only, and bounded: at most :data:`MAX_CONFIG_BYTES`, no anchors or aliases
    (``&a`` / ``*a``, which let a few lines expand to gigabytes: "billion laughs"), no
    nesting deeper than Python's recursion limit. Each refusal is one line naming the file.
    """
    from fsspec.core import url_to_fs

    shown = one_line(path, 120)
    try:
        fs, inner = url_to_fs(path)
        if fs.isdir(inner):
            raise UsageError(f"config file {shown!r} is a directory; pass a YAML file (e.g. configs/breakhis-vit-staged.yaml)")
        with fs.open(inner, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise UsageError(f"config file {shown!r} not found") from None
    except (OSError, ValueError, ImportError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else one_line(exc, 200)
        raise UsageError(f"config file {shown!r} cannot be read ({why})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise UsageError(f"config file {shown!r} is larger than {MAX_CONFIG_BYTES // 1024} KiB; "
                         f"a cdft config is a short list of options: is it the right file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"config file {shown!r} is not UTF-8 text; pass a YAML file") from None
    data = safe_yaml(text, f"config file {shown!r}")
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise UsageError(f"config file {shown!r} must be a mapping of configuration keys")
    return dict(data)


def safe_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load(text)`` without anchors and aliases; errors are one line naming ``what``."""
    import yaml

    try:
        return yaml.load(text, Loader=_no_alias_loader())  # noqa: S506 - a SafeLoader subclass
    except _AliasFound as found:
        raise UsageError(f"{what} {found}; cdft config files take no YAML anchors or aliases: write each value out") from None
    except _DuplicateKey as found:
        raise UsageError(f"{what}: {found}; keep one") from None
    except RecursionError:
        raise UsageError(f"{what} is nested too deeply to be a cdft config") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{what} is not valid YAML: {one_line(exc)}") from None


def yaml_value(raw: str, what: str) -> Any:
    """One option value read as YAML (``0.1`` -> float, ``yes`` -> True); text that is not
    valid YAML stays text, an anchor or alias is refused naming ``what``."""
    import yaml

    if not raw.strip():
        return ""
    try:
        return yaml.load(raw, Loader=_no_alias_loader())  # noqa: S506 - a SafeLoader subclass
    except _AliasFound as found:
        raise UsageError(f"{what}: the value {found}; write the value out") from None
    except _DuplicateKey as found:
        raise UsageError(f"{what}: in the value, {found}; keep one") from None
    except (yaml.YAMLError, RecursionError):
        return raw


class _AliasFound(Exception):
    """Raised by the loader of :func:`safe_yaml` at the first anchor or alias (its text says where)."""


class _DuplicateKey(Exception):
    """Raised by the loader of :func:`safe_yaml` at the first key repeated in one mapping (its text says where)."""


@functools.cache
def _no_alias_loader() -> type:
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        """``yaml.SafeLoader`` that refuses anchors and aliases before composing them, and
        a key repeated in one mapping (at any depth) before constructing it."""

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            line = event.start_mark.line + 1 if event.start_mark is not None else "?"
            if isinstance(event, yaml.AliasEvent):
                raise _AliasFound(f"uses the YAML alias *{one_line(event.anchor, 40)} (line {line})")
            if getattr(event, "anchor", None):
                raise _AliasFound(f"defines the YAML anchor &{one_line(event.anchor, 40)} (line {line})")
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<:`` merges; its keys may be overridden
                    continue
                key, line = self.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
                try:
                    first = lines.get(key)
                except TypeError:  # an unhashable key: SafeLoader's own error says so
                    continue
                if first is not None:
                    shown = one_line(key if isinstance(key, str) else repr(key), 60)
                    where = f"lines {first} and {line}" if first != line else f"line {line}"
                    raise _DuplicateKey(f"key {shown!r} appears twice ({where})")
                lines[key] = line
            return super().construct_mapping(node, deep=deep)

    return NoAliasLoader


def dump_mapping(data: Mapping[str, Any]) -> str:
    """``data`` as block YAML, keys in their order, without anchors (which :func:`load_yaml`
    refuses) even where two values are the same object."""
    import yaml

    class NoAliasDumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    return yaml.dump(dict(data), Dumper=NoAliasDumper, sort_keys=False, default_flow_style=False)
