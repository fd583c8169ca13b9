"""What the registry holds: registered components, open-ended resolvers, each plugin's load
report, and the lazy metadata values that keep ``cdft list`` free of torch.

:mod:`cdft_core.registry` builds and queries them; these are the plain records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from cdft_core.text import jsonable


class Lazy:
    """A metadata value computed on first access (e.g. a data config that needs timm).

    ``cdft list`` prints only cheap columns, so a plugin can describe expensive facts
    without making listing import torch: ``metadata={"data_config": Lazy(fn)}``.
    """

    def __init__(self, compute: Callable[[], Any]) -> None:
        self._compute = compute
        self._done = False
        self._value: Any = None

    def get(self) -> Any:
        if not self._done:
            self._value, self._done = self._compute(), True
        return self._value


class Metadata(Mapping):
    """A read-only mapping that resolves :class:`Lazy` values when they are read."""

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        self._data = dict(data or {})

    def __getitem__(self, key: str) -> Any:
        value = self._data[key]
        return value.get() if isinstance(value, Lazy) else value

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"Metadata({list(self._data)})"


@dataclass(frozen=True)
class Component:
    """One registered component: what ``cdft list`` shows and what a factory builds from."""

    name: str
    kind: str
    factory: Callable[..., Any]
    description: str
    provider: str
    metadata: Mapping[str, Any] = field(default_factory=Metadata)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "provider": self.provider,
            "description": self.description,
            "metadata": jsonable(dict(self.metadata)),
        }


@dataclass(frozen=True)
class Resolver:
    """An open-ended provider: claims names it recognises (e.g. any timm model name).

    ``claim(name)`` returns ``None`` or a mapping with ``factory`` and optionally
    ``description``, ``metadata`` and ``name`` (a canonical spelling).
    ``catalogue()`` lists the names it can resolve, for ``cdft list --all`` and patterns.
    """

    kind: str
    provider: str
    claim: Callable[[str], Mapping[str, Any] | None]
    catalogue: Callable[[], Iterable[str]] | None
    description: str


@dataclass
class PluginInfo:
    """What ``cdft plugins`` reports for one plugin."""

    name: str
    distribution: str
    version: str
    builtin: bool
    hooks: list[str] = field(default_factory=list)
    status: str = "ok"  # ok | broken | unavailable
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
