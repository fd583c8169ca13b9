"""The cache directory's locks (:mod:`cdft_core.data.cache_dir`), and the note a failed build
leaves for the processes that waited for it.

``<base>/.locks/<key>.build`` is held exclusively while a process builds, ``<key>.use``
shared by every process that has the cache open. Lock files are empty and never deleted
(a deleted lock file could be locked by two processes at once), created ``0o600`` and
opened with ``O_NOFOLLOW``: a symbolic link planted there is refused, never followed.

No-lock mode: without ``fcntl`` (Windows), where the lock file cannot be created or opened
(a read-only cache dir) or where the filesystem has no ``flock`` (some NFS and Lustre
mounts: ``ENOLCK``, ``ENOSYS``), nothing is locked and every lock is "taken". Builders may
then build twice, but the atomic rename still publishes only complete caches; a cache is
then never deleted for a rebuild, only moved aside, and ``cdft cache clear`` cannot tell
a cache in use from an idle one (as without ``fcntl``).

``<key>.failed`` holds the one-line error of the last failed build (and a token telling
one failure from the next): a process that waited for that build raises the same error
instead of building again. A process that did not wait builds again (the image may have
been fixed); a successful build removes the note.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import uuid
from pathlib import Path
from typing import Any

from cdft_core.errors import CdftError

#: folders the cache dir creates: private to their owner (an existing folder keeps its mode)
PRIVATE = 0o700
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class Lock:
    """A taken lock, released by :meth:`close` (or leaving a ``with`` block). ``locked`` is
    False in no-lock mode (see the module docstring): then nothing is held."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def exclusive(self) -> bool:
        """Turn this shared lock exclusive if no other process holds it (True); else it stays
        shared (False, as always in no-lock mode)."""
        if self._fd is None:
            return False
        import fcntl

        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            fcntl.flock(self._fd, fcntl.LOCK_SH)  # a failed conversion may drop the shared lock (flock(2))
            return False

    def share(self) -> None:
        """Back from :meth:`exclusive` to a shared lock."""
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_SH)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def lock(base: Path, key: str, kind: str, *, shared: bool = False, block: bool = True) -> Lock | None:
    """The lock ``base/.locks/<key>.<kind>``, taken (shared or exclusive) until closed; None
    when ``block`` is false and another process holds it; an unlocked :class:`Lock` where
    nothing can be locked. A symbolic link in its place is a :class:`CdftError`."""
    try:
        import fcntl
    except ImportError:
        return Lock(None)
    path = base / ".locks" / f"{key}.{kind}"
    try:
        make_private_dir(path.parent)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CdftError(f"refusing the lock file {path}: it is a symbolic link; "
                            f"remove it, or pass a --cache-dir of your own") from None
        try:  # a read-only cache dir: its existing lock files can still be locked
            fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
        except OSError:
            return Lock(None)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if block else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:  # no flock on this filesystem (ENOLCK, ENOSYS, EOPNOTSUPP): no-lock mode
        os.close(fd)
        return Lock(None)
    return Lock(fd)


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and its parents) if missing; the folders made here are ``0o700``."""
    missing = []
    for folder in (path, *path.parents):
        if folder.is_dir():
            break
        missing.append(folder)
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=PRIVATE)
    path.mkdir(mode=PRIVATE, exist_ok=True)  # raises if it is a file, or could not be made


def last_failure(base: Path, key: str) -> dict[str, Any] | None:
    """The note of the last failed build of ``key`` (``token``, ``error``), or None."""
    with contextlib.suppress(OSError, ValueError):
        note = json.loads((base / ".locks" / f"{key}.failed").read_text())
        if isinstance(note, dict) and isinstance(note.get("error"), str):
            return note
    return None


def record_failure(base: Path, key: str, exc: BaseException) -> None:
    """Leave the one-line error of a failed build for the processes waiting on it (best effort)."""
    error = str(exc) if isinstance(exc, CdftError) else f"{type(exc).__name__}: {exc}"
    text = json.dumps({"token": uuid.uuid4().hex, "error": error.splitlines()[0] if error else type(exc).__name__})
    with contextlib.suppress(OSError):
        fd = os.open(base / ".locks" / f"{key}.failed", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW, 0o600)
        with open(fd, "w") as handle:
            handle.write(text)


def forget_failure(base: Path, key: str) -> None:
    with contextlib.suppress(OSError):
        (base / ".locks" / f"{key}.failed").unlink()
