"""cdft: cross-domain fine-tuning of natural-image backbones on medical images.

The names below are the public plugin API. Importing this package is cheap (no torch):
the CLI's ``--help`` and ``cdft list`` depend on it.
"""

from __future__ import annotations

from importlib import metadata as _metadata

from cdft_core.errors import CdftError, PluginError, PluginUnavailable, UsageError
from cdft_core.hookspecs import hookimpl
from cdft_core.registry import Component, Lazy, get_registry

try:
    __version__ = _metadata.version("cdft")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "CdftError",
    "Component",
    "Lazy",
    "PluginError",
    "PluginUnavailable",
    "UsageError",
    "__version__",
    "get_registry",
    "hookimpl",
]
