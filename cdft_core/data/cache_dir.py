"""The image cache's directory: where it is, its locks, and what ``cdft cache list`` and
``cdft cache clear`` show and free (the caches themselves: :mod:`cdft_core.data.image_cache`).

``<cache dir>/images/`` holds one folder per cache key, ``.tmp-<key>-…`` folders while a
build runs (or after one was killed), and ``.locks/``: per key, ``<key>.build``
(exclusive while a process builds) and ``<key>.use`` (shared by every process that has
the cache open). ``clear`` removes a cache only when it can take both exclusively, so a
running job never loses the cache it reads. Lock files are empty and never deleted: a
deleted lock file could be locked by two processes at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cdft_core.errors import UsageError

MB = 1024 * 1024


def default_cache_dir() -> str:
    """``$CDFT_CACHE_DIR``, else the user cache dir: platformdirs' when installed, else
    ``$XDG_CACHE_HOME/cdft`` or ``~/.cache/cdft``. Read at each call, never at import."""
    env = os.environ.get("CDFT_CACHE_DIR")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    try:
        import platformdirs
    except ImportError:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(base, "cdft")
    return platformdirs.user_cache_dir("cdft", appauthor=False)


def images_dir(cache_dir: str | None = None) -> Path:
    """``<cache dir>/images``; the cache dir must be local (it is memory-mapped and locked)."""
    chosen = cache_dir or default_cache_dir()
    if "://" in chosen or "::" in chosen:
        raise UsageError(f"--cache-dir {chosen!r} must be a local directory (the cache is memory-mapped and locked)")
    return Path(os.path.abspath(os.path.expanduser(chosen))) / "images"


def lock(base: Path, key: str, kind: str, *, shared: bool = False, block: bool = True) -> IO[str] | None:
    """The open lock file ``base/.locks/<key>.<kind>``, locked (shared or exclusive) until
    closed; None when ``block`` is false and another process holds it. Without ``fcntl``
    (Windows) nothing is locked: builders may then build twice, but the atomic rename
    still publishes only complete caches."""
    (base / ".locks").mkdir(parents=True, exist_ok=True)
    handle = open(base / ".locks" / f"{key}.{kind}", "a+")  # noqa: SIM115 - closing it releases the lock
    try:
        import fcntl
    except ImportError:
        return handle
    try:
        fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if block else fcntl.LOCK_NB))
    except BlockingIOError:
        handle.close()
        return None
    return handle


def remove(path: Path) -> None:
    """Remove a folder or file if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        with contextlib.suppress(OSError):
            path.unlink()


@dataclass
class CacheEntry:
    """One folder under ``<cache dir>/images``, as ``cdft cache list`` shows it."""

    key: str
    directory: str
    megabytes: float
    complete: bool  # False: a build in progress, or left by one that was killed
    images: int | None = None
    size: str = ""
    interpolation: str = ""
    root: str = ""
    last_used: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def list_caches(cache_dir: str | None = None) -> list[CacheEntry]:
    """Every cache under the cache dir, last used first (no digest check: listing is cheap)."""
    base = images_dir(cache_dir)
    entries = []
    for folder in base.iterdir() if base.is_dir() else []:
        temporary = folder.name.startswith(".tmp-")
        if not folder.is_dir() or (folder.name.startswith(".") and not temporary):
            continue
        megabytes = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / MB
        key = folder.name[len(".tmp-"):].split("-", 1)[0] if temporary else folder.name
        entry = CacheEntry(key, str(folder), round(megabytes, 1), complete=False, last_used=folder.stat().st_mtime)
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            meta = json.loads((folder / "meta.json").read_text())
            entry.images, entry.root = int(meta["images"]), str(meta["root"])
            entry.size, entry.interpolation = "x".join(str(v) for v in meta["size"]), str(meta["interpolation"])
            entry.complete = not temporary
        entries.append(entry)
    return sorted(entries, key=lambda e: -e.last_used)


def clear_caches(cache_dir: str | None = None, keys: Sequence[str] = ()) -> tuple[list[CacheEntry], list[CacheEntry]]:
    """Remove the caches whose key starts with one of ``keys`` (all when empty); returns
    (removed, left in place because a process is building or using them)."""
    base = images_dir(cache_dir)
    removed, busy = [], []
    for entry in list_caches(cache_dir):
        if keys and not any(entry.key.startswith(k) for k in keys):
            continue
        building = lock(base, entry.key, "build", block=False)
        in_use = lock(base, entry.key, "use", block=False) if building is not None else None
        if building is None or in_use is None:
            busy.append(entry)
        else:
            remove(Path(entry.directory))
            removed.append(entry)
        for handle in (building, in_use):
            if handle is not None:
                handle.close()
    return removed, busy
