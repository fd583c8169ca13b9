"""The cache directory: where it is, its locks, how a cache is opened or built once and
published, and what ``cdft cache list`` and ``cdft cache clear`` show and free.

Two kinds of cache live there, each in its own folder: ``images/`` (decoded images,
:mod:`cdft_core.data.image_cache`) and ``features/`` (a frozen backbone's outputs,
:mod:`cdft_core.training.feature_store`). Both are opened with :func:`open_or_build`, so
they share one set of rules: each folder holds one sub-folder per cache key,
``.tmp-<key>-…`` folders while a build runs (or after one was killed), and ``.locks/``:
per key, ``<key>.build`` (exclusive while a process builds) and ``<key>.use`` (shared by
every process that has the cache open). A cache is built in a temporary folder, its
``meta.json`` written last, then published by one atomic rename. ``clear`` removes a
cache only when it can take both locks exclusively, so a running job never loses the
cache it reads. Lock files are empty and never deleted: a deleted lock file could be
locked by two processes at once (:mod:`cdft_core.data.cache_locks`, which also says what
happens where nothing can be locked, and how a failed build stops those waiting on it).

Only cdft's folders are caches: a key's folder holding a ``meta.json`` of that key, or a
build's ``.tmp-`` folder; ``list`` and ``clear`` never touch anything else there. A cache
that fails verification is rebuilt: removed first if no other process has it open, else
moved aside under a ``.tmp-`` name. A file that cannot be read (EIO, EMFILE) is an
error, never a reason to rebuild. Shared machines: the folders made here are ``0o700``
(an existing folder keeps its mode) and a cache folder owned by another user is never
used (not trusted: reuse-only opens skip it, builds stop with a one-line error).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdft_core.data.cache_locks import (
    PRIVATE,
    Lock,
    forget_failure,
    last_failure,
    lock,
    make_private_dir,
    record_failure,
)
from cdft_core.errors import CdftError, UsageError

MB = 1024 * 1024
#: the kinds of cache, each a folder of the cache dir
KINDS = ("images", "features")
#: a cache folder's name: its key (32 hex digits), or ``.tmp-<key>-<pid>-<hex>`` while it is built
CACHE_NAME = re.compile(r"(?P<key>[0-9a-f]{32})|\.tmp-(?P<building>[0-9a-f]{32})-[0-9]+-[0-9a-f]+")


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


def cache_root(cache_dir: str | None = None) -> Path:
    """The cache dir itself; it must be local (its caches are memory-mapped and locked)."""
    chosen = cache_dir or default_cache_dir()
    if "://" in chosen or "::" in chosen:
        raise UsageError(f"--cache-dir {chosen!r} must be a local directory (the cache is memory-mapped and locked)")
    return Path(os.path.abspath(os.path.expanduser(chosen)))


def images_dir(cache_dir: str | None = None) -> Path:
    """``<cache dir>/images``: the decoded-image caches."""
    return cache_root(cache_dir) / "images"


def features_dir(cache_dir: str | None = None) -> Path:
    """``<cache dir>/features``: the frozen-feature caches."""
    return cache_root(cache_dir) / "features"


def remove(path: Path) -> None:
    """Remove a folder or file if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        with contextlib.suppress(OSError):
            path.unlink()


@dataclass
class Opened:
    """A verified cache folder as :func:`open_or_build` hands it over."""

    directory: Path
    meta: dict[str, Any]
    status: str  # "built", "built by another process" or "reused"
    in_use: Lock  # the shared lock: `cdft cache clear` leaves the cache alone while it is open
    seconds: float = 0.0  # the build's time


def open_or_build(base: Path, key: str, *, verify: Callable[[Path], dict[str, Any] | None],
                  build: Callable[[Path], dict[str, Any]] | None, what: str, fix: str,
                  log: Callable[[str], None] | None = None) -> Opened | None:
    """The verified cache ``base/key``: reused, or built here once whatever the number of
    processes asking (the others wait for the builder, and stop with its error if it
    fails), or None when ``build`` is None and there is none (or it is not usable here:
    another user's, its lock refused).

    ``verify(folder)`` returns the ``meta.json`` of a complete, intact cache, else None
    (absent, truncated, corrupt); an OSError it raises (EIO, EMFILE) is a one-line error;
    ``build(temporary)`` writes the data files into a fresh temporary folder and returns
    the meta, which is written last before the folder is published by a rename. ``what``
    names the cache in messages, ``fix`` says what to do when its folder cannot be made.
    """
    final = base / key
    if build is None and not final.is_dir():
        return None
    try:
        in_use = lock(base, key, "use", shared=True)  # taken before looking: clear waits for us, or we for it
    except CdftError:
        if build is None:  # reuse only (cdft eval): decoding instead is as good
            return None
        raise
    try:
        if _foreign(final):
            if build is None:
                in_use.close()
                return None
            raise CdftError(f"the {what} {final} belongs to another user and is not trusted; {fix}")
        meta = _checked(verify, final, what, fix)
        if meta is not None:
            with contextlib.suppress(OSError):  # `cdft cache list` shows the last use; a read-only dir is fine
                os.utime(final)
            return Opened(final, meta, "reused", in_use)
        if build is None:
            in_use.close()
            return None
        failed_before = last_failure(base, key) or {}  # read first: the build we may wait for can fail any time
        building, status = lock(base, key, "build", block=False), "reused"
        if building is None:
            if log is not None:
                log(f"waiting for another process to finish the {what} {final}")
            building, status = lock(base, key, "build"), "built by another process"
        else:
            failed_before = None  # we waited for nobody: an earlier failure is no reason not to try
        with building:
            meta = _checked(verify, final, what, fix)
            if meta is not None:
                return Opened(final, meta, status, in_use)
            failure = last_failure(base, key) if failed_before is not None else None
            if failure is not None and failure != failed_before:  # the build we waited for failed: ours would too
                raise CdftError(failure["error"])
            start = time.time()
            _make_room(base, key, in_use, what, fix)
            try:
                meta = _build_and_publish(base, key, build, verify, what, fix)
            except Exception as exc:
                record_failure(base, key, exc)
                raise
            forget_failure(base, key)
            return Opened(final, meta, "built", in_use, time.time() - start)
    except BaseException:
        in_use.close()
        raise


def _foreign(folder: Path) -> bool:
    """Whether ``folder`` exists and belongs to another user (whose files we never trust)."""
    try:
        return hasattr(os, "getuid") and folder.stat().st_uid != os.getuid()
    except OSError:
        return False


def _checked(verify: Callable[[Path], dict[str, Any] | None], folder: Path, what: str, fix: str) -> dict[str, Any] | None:
    """``verify(folder)``; an OSError it lets through (not a corrupt cache: a file it could
    not read, EIO, EMFILE) is a one-line error, never a reason to rebuild over the cache."""
    try:
        return verify(folder)
    except OSError as exc:
        raise CdftError(f"cannot read the {what} {folder}: {exc}; {fix}") from exc


def _make_room(base: Path, key: str, in_use: Lock, what: str, fix: str) -> None:
    """Before a build (under the build lock): remove the damaged published folder and the
    temporary folders of killed builders when no other process has the cache open (the
    use lock turns exclusive); else move the published folder aside under a temporary
    name: its users keep reading it, a later build or ``cdft cache clear`` removes it."""
    final = base / key
    if in_use.exclusive():
        try:
            remove(final)
            for stale in base.glob(f".tmp-{key}-*"):
                remove(stale)
        finally:
            in_use.share()
    elif final.exists() or final.is_symlink():
        try:
            os.rename(final, _temporary(base, key))
        except OSError as exc:
            raise CdftError(f"cannot move the damaged {what} {final} aside: {exc}; {fix}") from exc


def _temporary(base: Path, key: str) -> Path:
    return base / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _build_and_publish(base: Path, key: str, build: Callable[[Path], dict[str, Any]],
                       verify: Callable[[Path], dict[str, Any] | None], what: str, fix: str) -> dict[str, Any]:
    temporary = _temporary(base, key)
    try:
        make_private_dir(base)
        temporary.mkdir(mode=PRIVATE)
    except OSError as exc:
        raise CdftError(f"cannot create the {what} dir {base}: {exc}; {fix}") from exc
    try:
        meta = build(temporary)
        (temporary / "meta.json").write_text(json.dumps(meta))
        for path in temporary.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        try:
            os.rename(temporary, base / key)
        except OSError:  # published meanwhile by a builder without our lock (no fcntl): theirs is as good
            if verify(base / key) is None:
                raise
    finally:
        remove(temporary)
    return meta


def check_free_space(base: Path, needed: int, what: str, fix: str) -> None:
    """Refuse, before writing anything, a cache that the disk under ``base`` cannot hold."""
    if shutil.disk_usage(base).free < needed + 64 * MB:
        raise _no_room(base, needed, what, fix)


def allocate(path: Path, what: str, fix: str) -> None:
    """Give the file at ``path`` all its disk blocks now (``posix_fallocate``, where there is
    one): a memory-mapped sparse file on a disk that fills up kills the process writing it
    (SIGBUS); this way a full disk is :func:`check_free_space`'s one-line error."""
    if not hasattr(os, "posix_fallocate"):
        return
    size = path.stat().st_size
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise _no_room(path.parent, size, what, fix) from None
        # not supported here (EOPNOTSUPP, EINVAL): the file stays sparse, as without the call
    finally:
        os.close(fd)


def _no_room(base: Path, needed: int, what: str, fix: str) -> CdftError:
    free = shutil.disk_usage(base).free
    return CdftError(f"the {what} needs {needed / MB:.0f} MB but {base} has {free / MB:.0f} MB free; {fix}")


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read sequentially in 8 MB blocks."""
    digest = hashlib.sha256()
    buffer = bytearray(8 * MB)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while True:
            count = handle.readinto(buffer)
            if not count:
                return digest.hexdigest()
            digest.update(view[:count])


@dataclass
class CacheEntry:
    """One folder under ``<cache dir>/images`` or ``<cache dir>/features``, as ``cdft cache list`` shows it."""

    key: str
    directory: str
    megabytes: float
    complete: bool  # False: a build in progress, or left by one that was killed
    images: int | None = None
    size: str = ""  # images: HxW; features: what is stored (backbone, split, parts)
    interpolation: str = ""
    root: str = ""
    last_used: float = 0.0
    kind: str = "images"  # or "features"

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def list_caches(cache_dir: str | None = None) -> list[CacheEntry]:
    """Every cache of every kind under the cache dir, last used first (no digest check: listing is cheap).

    Only cdft's folders count: one named by a key (:data:`CACHE_NAME`) whose ``meta.json``
    has that key, or a build's temporary folder. Anything else there (``--cache-dir
    ~/project`` holding ``images/benign``) is neither listed, sized nor cleared. A folder
    that vanishes while it is listed (a build published, a cache cleared) is left out."""
    entries = []
    for kind in KINDS:
        base = cache_root(cache_dir) / kind
        for folder in base.iterdir() if base.is_dir() else []:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                entry = _entry(folder, kind)
                if entry is not None:
                    entries.append(entry)
    return sorted(entries, key=lambda e: -e.last_used)


def _entry(folder: Path, kind: str) -> CacheEntry | None:
    name = CACHE_NAME.fullmatch(folder.name)
    if name is None or not folder.is_dir():
        return None
    temporary = name["building"] is not None
    meta: Any = None
    with contextlib.suppress(OSError, ValueError):
        meta = json.loads((folder / "meta.json").read_text())
    if not temporary and not (isinstance(meta, dict) and meta.get("key") == folder.name):
        return None
    megabytes = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / MB
    entry = CacheEntry(name["key"] or name["building"], str(folder), round(megabytes, 1), complete=not temporary,
                       last_used=folder.stat().st_mtime, kind=kind)
    with contextlib.suppress(ValueError, KeyError, TypeError):
        entry.images, entry.root = int(meta["images"]), str(meta["root"])
        if kind == "images":
            entry.size, entry.interpolation = "x".join(str(v) for v in meta["size"]), str(meta["interpolation"])
        else:
            entry.size = str(meta["contents"])
    return entry


def clear_caches(cache_dir: str | None = None, keys: Sequence[str] = ()) -> tuple[list[CacheEntry], list[CacheEntry]]:
    """Remove the caches whose key starts with one of ``keys`` (all when empty); returns
    (removed, left in place because a process is building or using them). Only what was
    really removed counts: a folder gone meanwhile (a build published) is neither."""
    removed, busy = [], []
    for entry in list_caches(cache_dir):
        if keys and not any(entry.key.startswith(k) for k in keys):
            continue
        base, folder = cache_root(cache_dir) / entry.kind, Path(entry.directory)
        building = lock(base, entry.key, "build", block=False)
        in_use = lock(base, entry.key, "use", block=False) if building is not None else None
        try:
            if not folder.is_dir():
                continue
            if building is None or in_use is None:
                busy.append(entry)
            else:
                remove(folder)
                if not folder.exists():
                    removed.append(entry)
        finally:
            for handle in (building, in_use):
                if handle is not None:
                    handle.close()
    return removed, busy
