"""Fold assignment and fold protocols.

Why these live apart from the datasets: the same few recipes serve every dataset.

- :func:`stratified_folds` is the paper's image-level recipe, exactly scikit-learn's
  ``StratifiedKFold(n_splits, shuffle=True, random_state=seed)`` over the rows in the
  order given (datasets pass them sorted by path), so the paper's folds are reproduced.
- :func:`stratified_group_folds` keeps every group (a BreakHis patient) in one fold while
  balancing each class across folds; it is our own greedy rule, written out below so the
  result is explainable and stable across scikit-learn versions.
- A :class:`FoldProtocol` says which folds are train, validation and test for a given
  ``val_fold``/``test_fold``: ``standard`` (train on the rest) and ``low-data`` (the HCRF
  paper: train on the one fold named as test fold, test on the rest). It also states its
  cross-validation rotations (the ``val_fold``/``test_fold`` pairs ``cdft cv`` runs),
  because only the protocol knows which pairs give every fold its turn.

pandas, numpy and scikit-learn are imported inside the functions: plugin modules import
this module and must stay cheap to import.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cdft_core.errors import CdftError, UsageError

if TYPE_CHECKING:
    import pandas as pd


# -- fold protocols -----------------------------------------------------------------


@dataclass(frozen=True)
class FoldProtocol:
    """How ``val_fold`` and ``test_fold`` map to the train/val/test folds.

    ``select(folds, val_fold, test_fold)`` receives the sorted fold numbers present in
    the table and returns ``{"train": [...], "val": [...], "test": [...]}``.

    ``rotations(k)`` states the protocol's cross-validation for ``k`` folds: one
    ``(val, test)`` pair per rotation, as positions ``0..k-1`` in the sorted folds
    (:func:`fold_rotations` turns them into fold numbers). ``None``: the protocol
    declares no rotations, and ``cdft cv`` says so instead of guessing.
    """

    name: str
    description: str
    select: Callable[[Sequence[int], int, int], dict[str, list[int]]]
    rotations: Callable[[int], Sequence[tuple[int, int]]] | None = None


def _standard(folds: Sequence[int], val_fold: int, test_fold: int) -> dict[str, list[int]]:
    return {"train": [f for f in folds if f not in (val_fold, test_fold)], "val": [val_fold], "test": [test_fold]}


def _low_data(folds: Sequence[int], val_fold: int, test_fold: int) -> dict[str, list[int]]:
    return {"train": [test_fold], "val": [val_fold], "test": [f for f in folds if f not in (val_fold, test_fold)]}


def standard_rotations(k: int) -> list[tuple[int, int]]:
    """Rotation r tests on fold r and validates on fold (r+1) mod k: every fold is tested once."""
    return [((r + 1) % k, r) for r in range(k)]


def low_data_rotations(k: int) -> list[tuple[int, int]]:
    """Rotation r validates on fold r and trains on fold (r+1) mod k (the fold named test_fold),
    testing on the others: every fold is the training fold once, and rotation 0 is the
    HCRF paper's own run (val_fold 0, test_fold 1)."""
    return [(r, (r + 1) % k) for r in range(k)]


STANDARD = FoldProtocol(
    "standard",
    "train = every fold except the validation and test folds; val = val_fold; test = test_fold",
    _standard,
    standard_rotations,
)
LOW_DATA = FoldProtocol(
    "low-data",
    "the HCRF paper's protocol: train = the fold named test_fold only; val = val_fold; test = every other fold",
    _low_data,
    low_data_rotations,
)
#: The protocols every :class:`~cdft_core.data.protocol.BaseDataset` offers.
PROTOCOLS: dict[str, FoldProtocol] = {p.name: p for p in (STANDARD, LOW_DATA)}


def split_table(
    table: pd.DataFrame, protocol: FoldProtocol, val_fold: int, test_fold: int
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Cut a table with a ``fold`` column into train, val and test; every part non-empty."""
    present = sorted(int(f) for f in table["fold"].unique())
    for option, fold in (("--val-fold", val_fold), ("--test-fold", test_fold)):
        if fold not in present:
            raise UsageError(f"{option} {fold} does not exist; the split has folds {_fold_list(present)}")
    if val_fold == test_fold:
        raise UsageError(
            f"--val-fold and --test-fold are both {val_fold}; choose two different folds from {_fold_list(present)}"
        )
    chosen = protocol.select(present, val_fold, test_fold)
    parts = []
    for part in ("train", "val", "test"):
        folds = chosen[part]
        rows = table[table["fold"].isin(folds)].reset_index(drop=True)
        if rows.empty:
            raise UsageError(
                f"protocol {protocol.name!r} leaves the {part} split empty (folds {_fold_list(present)}, "
                f"val_fold={val_fold}, test_fold={test_fold}); make more folds with `cdft prepare --folds`"
            )
        parts.append(rows)
    return parts[0], parts[1], parts[2]


def fold_rotations(protocol: FoldProtocol, folds: Sequence[int]) -> list[tuple[int, int]]:
    """The ``(val_fold, test_fold)`` fold numbers of each rotation of ``protocol`` over the
    sorted ``folds`` present; a protocol without rotations, or with impossible ones, is an error."""
    present = sorted(int(f) for f in folds)
    if protocol.rotations is None:
        raise UsageError(f"protocol {protocol.name!r} declares no cross-validation rotations; give its FoldProtocol "
                         f"a rotations(k) function (docs/datasets.md), or run single folds with `cdft run`")
    if len(present) < 2:
        raise UsageError(f"cross-validation needs at least 2 folds; the split has folds {_fold_list(present)}")
    pairs = [tuple(int(f) for f in pair) for pair in protocol.rotations(len(present))]
    bad = [p for p in pairs if len(p) != 2 or p[0] == p[1] or not all(0 <= f < len(present) for f in p)]
    if not pairs or bad or len(set(pairs)) != len(pairs):
        raise CdftError(f"protocol {protocol.name!r} declares invalid rotations for {len(present)} folds: {pairs}; "
                        f"each must be a distinct (val, test) pair of different positions 0..{len(present) - 1}")
    return [(present[v], present[t]) for v, t in pairs]


def _fold_list(folds: Sequence[int]) -> str:
    return ", ".join(str(f) for f in folds) or "none"


# -- fold assignment ----------------------------------------------------------------


def check_fold_count(folds: int, units: int, unit_name: str) -> None:
    """Refuse fold counts that cannot give every fold at least one ``unit_name``."""
    if folds < 2:
        raise UsageError(f"--folds {folds} is too small; use at least 2 folds")
    if folds > units:
        raise UsageError(
            f"--folds {folds} is more than the {units} {unit_name} found; use --folds {max(units, 2)} or fewer"
        )


def stratified_folds(labels: Sequence[int], folds: int, seed: int) -> list[int]:
    """The paper's image-level split: scikit-learn's shuffled ``StratifiedKFold``.

    Row ``i`` gets the index of the split in which it is a test row. The caller fixes the
    row order (sorted paths), so the same files always give the same folds.
    """
    from sklearn.model_selection import StratifiedKFold

    check_fold_count(folds, len(labels), "images")
    out = [0] * len(labels)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "least populated class has fewer members than n_splits": reported by the summary.
        warnings.simplefilter("ignore", UserWarning)
        for fold, (_, test_rows) in enumerate(splitter.split([[0]] * len(labels), list(labels))):
            for row in test_rows:
                out[int(row)] = fold
    return out


def stratified_group_folds(labels: Sequence[int], groups: Sequence[Any], folds: int, seed: int) -> list[int]:
    """Assign whole groups to folds, balancing every class across the folds.

    The rule (deterministic for a seed):

    1. order the groups by their sorted names, shuffle that order with ``seed``, then
       stable-sort it by group size, largest first;
    2. put each group into the fold that currently holds the fewest images *of the
       group's own classes* (weighted by how many images of each class the group has);
       ties go to the fold with fewer images overall, then to the lower fold number.

    For one class this is the classic largest-first balancing, which keeps every fold's
    count within one group's size of the even share; with several classes it balances
    each class the group actually contributes to. A group whose images carry two labels
    (a patient filed under two tumour types) still lands in exactly one fold.
    """
    import numpy as np

    keys = [str(g) for g in groups]
    names = sorted(set(keys))
    check_fold_count(folds, len(names), "groups (patients)")
    classes = sorted(set(int(label) for label in labels))
    column = {c: i for i, c in enumerate(classes)}
    index = {name: i for i, name in enumerate(names)}
    counts = np.zeros((len(names), len(classes)), dtype=np.int64)
    for key, label in zip(keys, labels, strict=True):
        counts[index[key], column[int(label)]] += 1

    order = np.random.RandomState(seed).permutation(len(names))
    order = sorted(order.tolist(), key=lambda g: -int(counts[g].sum()))  # stable: keeps shuffled ties
    per_fold = np.zeros((folds, len(classes)), dtype=np.int64)
    fold_of_group = [0] * len(names)
    for g in order:
        own = per_fold @ counts[g]  # images of this group's classes already in each fold
        totals = per_fold.sum(axis=1)
        best = min(range(folds), key=lambda f: (int(own[f]), int(totals[f]), f))
        per_fold[best] += counts[g]
        fold_of_group[g] = best
    return [fold_of_group[index[key]] for key in keys]
