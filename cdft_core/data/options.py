"""A dataset's options: checked against what it declares, defaults filled in, then its
factory called (:func:`build_dataset`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cdft_core.data.protocol import Dataset
from cdft_core.errors import CdftError, UsageError

if TYPE_CHECKING:
    from cdft_core.registry import Component, Registry


def declared_options(component: Component) -> dict[str, dict[str, Any]]:
    """The options a registered dataset declares (name -> choices/default/help)."""
    return dict(component.metadata.get("options") or {})


def option_key(name: str) -> str:
    """``--normal-dir`` / ``normal-dir`` / ``normal_dir`` -> ``normal_dir``."""
    return str(name).lstrip("-").replace("-", "_")


def resolve_options(component: Component, options: Mapping[str, Any] | None) -> dict[str, str]:
    """Check user options against the dataset's declared ones and fill in the defaults."""
    declared = declared_options(component)
    # named without a flag spelling: `cdft prepare --task X` and `cdft run --dataset-option task=X` both land here
    valid = ", ".join(declared) or "none"
    out: dict[str, str] = {}
    for raw_key, raw_value in (options or {}).items():
        key = option_key(raw_key)
        if key not in declared:
            raise UsageError(f"dataset {component.name!r} has no option {key!r}; its options: {valid}")
        value = str(raw_value)
        choices = declared[key].get("choices")
        if choices:
            match = next((c for c in choices if c.lower() == value.lower()), None)
            if match is None:
                raise UsageError(
                    f"invalid value {value!r} for option {key!r} of dataset {component.name!r}; choose from: {', '.join(choices)}"
                )
            value = match
        out[key] = value
    for key, spec in declared.items():
        if key not in out and spec.get("default") is not None:
            out[key] = str(spec["default"])
    return {key: out[key] for key in declared if key in out}  # declared order: stable output


def build_dataset(
    name: str, options: Mapping[str, Any] | None = None, registry: Registry | None = None
) -> tuple[Dataset, dict[str, str]]:
    """Resolve ``name``, check its options and call its factory."""
    from cdft_core.registry import get_registry

    component = (registry or get_registry()).get("dataset", name)
    resolved = resolve_options(component, options)
    dataset = component.factory(**resolved)
    if not isinstance(dataset, Dataset):
        raise CdftError(
            f"dataset {name!r} (plugin {component.provider!r}) did not return a Dataset object; "
            f"see docs/datasets.md for the protocol"
        )
    return dataset, resolved


def choose_protocol(dataset: Dataset, protocol: str | None) -> str:
    chosen = protocol or dataset.default_protocol
    if chosen not in dataset.protocols:
        raise UsageError(
            f"unknown protocol {chosen!r} for dataset {dataset.name!r}; choose from: {', '.join(dataset.protocols)}"
        )
    return chosen
