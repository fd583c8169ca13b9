"""The frozen-feature cache on disk: a frozen backbone's outputs, stored once, memory-mapped.

What is stored, and when it may be reused, is decided by :mod:`cdft_core.training.frozen`
(it hands over the key's inputs and the batches to store); this module only keeps them:

- ``<cache dir>/features/<key>/`` holds one ``.npy`` file per stored part,
  ``tokens.npy`` (R×N×C) and/or ``pooled.npy`` (R×C), row *r* being the *r*-th item of
  the batches it was built from, in the dtype the backbone returned them (``bfloat16``
  kept as its raw 16 bits: NumPy has no bfloat16), and ``meta.json`` (the key's inputs,
  each part's shape and dtype, the SHA-256 of each file), written last.
- The key is the SHA-256 of the inputs; a change of any of them gives a new cache, never
  a stale one. The directory, the file locks (built once, whatever the number of
  processes asking; never removed by ``cdft cache clear`` while open), the atomic publish
  and ``cdft cache list``/``clear`` are the image cache's
  (:func:`cdft_core.data.cache_dir.open_or_build`).
- The size is logged, and checked against the free disk space, before anything is
  written: after the first batch, which gives the shapes and dtypes.
- Every open checks each file's size, shape, dtype and SHA-256 against ``meta.json``; a
  truncated or corrupt cache is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdft_core.data.cache_dir import MB, allocate, check_free_space, features_dir, file_digest, open_or_build
from cdft_core.data.cache_locks import Lock
from cdft_core.errors import CdftError
from cdft_core.models.model import Features

#: Version of the layout above; part of the key.
FORMAT = 1
#: torch dtype name -> how NumPy stores it
_STORED = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "bfloat16": np.uint16}
PARTS = ("tokens", "pooled")


class FeatureStore:
    """An opened feature cache: ``rows`` rows of each stored part, mapped on first use."""

    def __init__(self, directory: Path, meta: Mapping[str, Any], status: str, in_use: Lock | None = None,
                 seconds: float = 0.0) -> None:
        self.directory = str(directory)
        self.key = str(meta["key"])
        self.rows = int(meta["rows"])
        self.parts: dict[str, dict[str, Any]] = dict(meta["parts"])
        self.contents = str(meta["contents"])
        self.status = status  # "built", "built by another process" or "reused"
        self.nbytes = sum(int(part["file_bytes"]) for part in self.parts.values())
        self.seconds = seconds
        self._mapped: dict[str, np.ndarray] = {}
        self._in_use = in_use
        if in_use is not None:
            weakref.finalize(self, in_use.close)

    def take(self, rows: Sequence[int] | slice) -> Features:
        """The stored tensors of ``rows`` (copies: the mapping is read-only), None for a part not stored."""
        return Features(*(self._tensor(name, rows) if name in self.parts else None for name in PARTS))

    def _tensor(self, name: str, rows: Sequence[int] | slice) -> torch.Tensor:
        if name not in self._mapped:
            self._mapped[name] = np.load(Path(self.directory) / f"{name}.npy", mmap_mode="r")
        values = torch.from_numpy(np.array(self._mapped[name][rows]))
        return values.view(torch.bfloat16) if self.parts[name]["dtype"] == "bfloat16" else values

    def describe(self) -> str:
        """The one log line: what was found or built, its size and where it is."""
        took = f" in {self.seconds:.1f} s" if self.status == "built" else ""
        return f"feature cache {self.status}{took}: {self.contents}, {self.nbytes / MB:.1f} MB, {self.directory}"

    def close(self) -> None:
        """Unmap the files and release the shared lock (``cdft cache clear`` may remove it then)."""
        self._mapped.clear()
        if self._in_use is not None:
            self._in_use.close()
            self._in_use = None


def feature_key(inputs: Mapping[str, Any]) -> str:
    """The cache key of a store: a hash of everything that determines its contents."""
    return hashlib.sha256(json.dumps({"format": FORMAT, **inputs}, sort_keys=True).encode()).hexdigest()[:32]


def open_store(inputs: Mapping[str, Any], batches: Callable[[], Iterable[Features]], *, rows: int, contents: str,
               root: str, cache_dir: str | None = None, log: Callable[[str], None] | None = None) -> FeatureStore:
    """The verified store keyed by ``inputs``: reused, or built here from ``batches()``
    (the features of rows 0, 1, ... in order, ``rows`` in all); logs one line.

    ``contents`` says what it holds in words (``cdft cache list`` and the log show it),
    ``root`` the data root its images came from.
    """
    key = feature_key(inputs)

    def build(temporary: Path) -> dict[str, Any]:
        return _build(temporary, key, dict(inputs), batches(), rows=rows, contents=contents, root=root, log=log)

    opened = open_or_build(features_dir(cache_dir), key, verify=lambda folder: _verified(folder, key), build=build,
                           what="feature cache", fix="pass another --cache-dir DIR, or --no-feature-cache", log=log)
    assert opened is not None  # a build function was given
    store = FeatureStore(opened.directory, opened.meta, opened.status, opened.in_use, opened.seconds)
    if log is not None:
        log(store.describe())
    return store


def _build(temporary: Path, key: str, inputs: dict[str, Any], batches: Iterable[Features], *, rows: int,
           contents: str, root: str, log: Callable[[str], None] | None) -> dict[str, Any]:
    """Write every batch's parts into ``temporary``; returns the meta (written last by the caller)."""
    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    written = 0
    for batch in batches:
        present = {name: tensor for name, tensor in zip(PARTS, batch, strict=True) if tensor is not None}
        if not arrays:
            arrays, dtypes = _allocate(temporary, present, rows, contents, log)
        count = next(iter(present.values())).shape[0]
        if written + count > rows:
            raise CdftError(f"the feature cache got more than the {rows} rows it was built for")
        for name, tensor in present.items():
            arrays[name][written:written + count] = _to_numpy(tensor)
        written += count
    if written != rows:
        raise CdftError(f"the feature cache got {written} rows, expected {rows}")
    parts = {}
    for name, array in arrays.items():
        array.flush()
        path = temporary / f"{name}.npy"
        parts[name] = {"shape": list(array.shape), "dtype": dtypes[name],
                       "file_bytes": path.stat().st_size, "sha256": file_digest(path)}
    return {"key": key, "inputs": inputs, "rows": rows, "parts": parts, "contents": contents, "root": root,
            "images": rows, "created": time.time()}


def _allocate(temporary: Path, first: Mapping[str, torch.Tensor], rows: int, contents: str,
              log: Callable[[str], None] | None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The files of every part and their dtypes, sized from the first batch, once the disk is
    known to hold them."""
    shapes = {name: (rows, *tensor.shape[1:]) for name, tensor in first.items()}
    dtypes = {name: str(tensor.dtype).removeprefix("torch.") for name, tensor in first.items()}
    unknown = sorted(d for d in dtypes.values() if d not in _STORED)
    if unknown:
        raise CdftError(f"the feature cache cannot store {unknown[0]} features; pass --no-feature-cache")
    needed = sum(math.prod(shapes[n]) * np.dtype(_STORED[dtypes[n]]).itemsize for n in first)
    if log is not None:
        log(f"feature cache: computing {contents} ({', '.join(f'{n} {_shape(shapes[n][1:])} {dtypes[n]}' for n in first)}), "
            f"{needed / MB:.1f} MB, into {temporary.parent}")
    fix = "pass --cache-dir on a larger disk, or --no-feature-cache"
    check_free_space(temporary.parent, needed, "feature cache", fix)
    arrays = {}
    for name in first:
        path = temporary / f"{name}.npy"
        arrays[name] = np.lib.format.open_memmap(path, mode="w+", dtype=_STORED[dtypes[name]], shape=shapes[name])
        allocate(path, "feature cache", fix)  # every block now: a disk filling up later is an error, not SIGBUS
    return arrays, dtypes


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(v) for v in shape)


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    values = tensor.detach().to("cpu").contiguous()
    if values.dtype == torch.bfloat16:
        return values.view(torch.int16).numpy().view(np.uint16)
    return values.numpy()


def _verified(directory: Path, key: str) -> dict[str, Any] | None:
    """``meta.json`` of a complete, intact store at ``directory``; None if absent, truncated or corrupt."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
        if not isinstance(meta, dict) or meta.get("key") != key or not meta.get("parts"):
            return None
        for name, part in meta["parts"].items():
            path = directory / f"{name}.npy"
            if name not in PARTS or path.stat().st_size != part["file_bytes"]:
                return None
            array = np.load(path, mmap_mode="r")
            if array.dtype != np.dtype(_STORED[part["dtype"]]) or list(array.shape) != part["shape"] \
                    or array.shape[0] != meta["rows"]:
                return None
            del array
            if file_digest(path) != part["sha256"]:
                return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None
