"""Checks before any work: every name and option resolved, the run's splits loaded.

Cheap (no model): the CLI calls them before launching processes, so that a typo costs
a second, not a cluster allocation; :func:`~cdft_core.training.engine.setup` calls
them again in every process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cdft_core.config import RunConfig
from cdft_core.errors import UsageError

if TYPE_CHECKING:
    from cdft_core.data.splits import Splits
    from cdft_core.strategy import Strategy


def preflight(config: RunConfig) -> tuple[Strategy, str]:
    """Resolve every name and option through the registry; returns (strategy, adapter name)."""
    from cdft_core.data.options import build_dataset
    from cdft_core.registry import get_registry
    from cdft_core.strategy import build_strategy, check_adapter

    registry = get_registry()
    build_dataset(config.dataset, config.dataset_options, registry)
    registry.get("backbone", config.backbone)
    strategy = build_strategy(config.strategy, config.strategy_options, registry=registry)
    adapter = config.adapter or strategy.default_adapter
    registry.get("adapter", adapter)
    check_adapter(strategy, adapter, registry=registry)
    return strategy, adapter


def load_run_splits(config: RunConfig) -> Splits:
    """The run's train/val/test tables (folds checked, none empty); reads the split file or scans the root."""
    from cdft_core.data.splits import load_splits

    splits = load_splits(
        config.dataset, config.data_root, split_file=config.split_file, val_fold=config.val_fold,
        test_fold=config.test_fold, protocol=config.protocol, options=config.dataset_options,
        folds=config.folds, seed=config.seed,
    )
    for name in ("train", "val", "test"):
        if len(getattr(splits, name)) == 0:
            raise UsageError(f"the {name} split is empty (val fold {config.val_fold}, test fold {config.test_fold}); check the folds")
    return splits
