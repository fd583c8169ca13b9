"""The hook specifications of the ``cdft`` plugin system: one per kind of component.

Each hook receives a ``register`` callable supplied by the core (see
:class:`cdft_core.registry.Registrar`); a plugin implements only the hooks it needs.
"""

from __future__ import annotations

import pluggy

PROJECT = "cdft"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_datasets(register):
    """Register datasets: ``register(name, factory, description=..., metadata=...)``."""


@hookspec
def register_backbones(register):
    """Register backbones; ``register.resolver(...)`` claims open-ended name families."""


@hookspec
def register_adapters(register):
    """Register adapters placed between the backbone's tokens and the head."""


@hookspec
def register_strategies(register):
    """Register fine-tuning strategies (labellings of the parameter tree plus stages)."""
