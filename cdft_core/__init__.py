"""cdft: cross-domain fine-tuning of natural-image backbones on medical images.

This module is the one plugin API: a plugin (built-in or third-party) imports from
``cdft_core`` and nothing deeper. The names are listed in ``__all__`` and in
docs/plugins.md. Importing this package is cheap and loads no torch: the torch-free
names below are imported directly, the others (models, weights, image decoding) are
resolved on first use through the module ``__getattr__``, so ``cdft --help``,
``cdft list`` and plugin modules stay fast.
"""

from __future__ import annotations

import importlib
from importlib import metadata as _metadata
from typing import Any

from cdft_core.components import Component, Lazy
from cdft_core.data.folds import (
    LOW_DATA,
    PROTOCOLS,
    STANDARD,
    FoldProtocol,
    split_table,
    stratified_folds,
    stratified_group_folds,
)
from cdft_core.data.protocol import (
    SPLIT_COLUMNS,
    BaseDataset,
    Dataset,
    DatasetOption,
    class_names_from_table,
    dataset_metadata,
    split_names,
)
from cdft_core.data.root import IMAGE_EXTENSIONS, DataRoot
from cdft_core.data.tables import read_split_file
from cdft_core.errors import CdftError, Interrupted, PluginError, PluginUnavailable, UsageError
from cdft_core.functional.pytree import FROZEN
from cdft_core.hookspecs import hookimpl
from cdft_core.models.foundation_table import FOUNDATION_MODELS, foundation_data_config
from cdft_core.registry import get_registry, load_registry, use_registry
from cdft_core.strategy import (
    TRAINABLE,
    Stage,
    Strategy,
    parse_option,
    parse_stage_epochs,
    strategy_metadata,
    train_all,
    train_only,
)
from cdft_core.text import one_line, parse_bool

try:
    __version__ = _metadata.version("cdft")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

#: Names that need torch, and the module each comes from (imported on first use).
_LAZY: dict[str, str] = {
    # backbones (docs/models.md)
    "Backbone": "cdft_core.models.backbone",
    "TimmBackbone": "cdft_core.models.backbone",
    "build_timm_backbone": "cdft_core.models.backbone",
    "canonical_timm_name": "cdft_core.models.backbone",
    "timm_data_config": "cdft_core.models.backbone",
    "timm_family": "cdft_core.models.backbone",
    "hub_filenames": "cdft_core.models.backbone",
    "load_backbone_weights": "cdft_core.models.backbone",
    "build_foundation_backbone": "cdft_core.models.foundation",
    # weights: local files and the Hugging Face cache
    "read_state_dict": "cdft_core.models.weights",
    "resolve_hub_file": "cdft_core.models.weights",
    "load_state_dict_checked": "cdft_core.models.weights",
    "LoadReport": "cdft_core.models.weights",
    # adapters
    "PooledAdapter": "cdft_core.models.adapters",
    "Cdtm": "cdft_core.models.adapters",
    # LoRA (peft), for strategies that change the model (docs/strategies.md#lora)
    "inject_lora": "cdft_core.models.lora",
    "merge_lora": "cdft_core.models.lora",
    "lora_targets": "cdft_core.models.lora",
    "is_lora_parameter": "cdft_core.models.lora",
    # images
    "decode_image": "cdft_core.data.images",
}

__all__ = [
    # torch-free: imported above
    "BaseDataset",
    "CdftError",
    "Component",
    "DataRoot",
    "Dataset",
    "DatasetOption",
    "FOUNDATION_MODELS",
    "FROZEN",
    "FoldProtocol",
    "IMAGE_EXTENSIONS",
    "Interrupted",
    "LOW_DATA",
    "Lazy",
    "PROTOCOLS",
    "PluginError",
    "PluginUnavailable",
    "SPLIT_COLUMNS",
    "STANDARD",
    "Stage",
    "Strategy",
    "TRAINABLE",
    "UsageError",
    "__version__",
    "class_names_from_table",
    "dataset_metadata",
    "foundation_data_config",
    "get_registry",
    "hookimpl",
    "load_registry",
    "use_registry",
    "one_line",
    "parse_bool",
    "parse_option",
    "parse_stage_epochs",
    "read_split_file",
    "split_names",
    "split_table",
    "strategy_metadata",
    "stratified_folds",
    "stratified_group_folds",
    "train_all",
    "train_only",
    # need torch: resolved on first use (_LAZY)
    "Backbone",
    "TimmBackbone",
    "build_timm_backbone",
    "canonical_timm_name",
    "timm_data_config",
    "timm_family",
    "hub_filenames",
    "load_backbone_weights",
    "build_foundation_backbone",
    "read_state_dict",
    "resolve_hub_file",
    "load_state_dict_checked",
    "LoadReport",
    "PooledAdapter",
    "Cdtm",
    "inject_lora",
    "merge_lora",
    "lora_targets",
    "is_lora_parameter",
    "decode_image",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cdft_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
