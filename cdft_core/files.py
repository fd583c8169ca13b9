"""Writing a whole file atomically, on a local disk or any fsspec filesystem.

Readers never see half a file, and a failure leaves any previous file as it was and no
temporary file behind: the run directory (resumable at any moment) and the split files
``cdft prepare`` writes both rely on it.
"""

from __future__ import annotations

import os
import tempfile
import uuid

from cdft_core.errors import CdftError, UsageError
from cdft_core.text import one_line


def existing_ancestor(path: str) -> str:
    """The nearest existing folder (or file) at or above local ``path``."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    return probe


def unwritable_reason(path: str) -> str | None:
    """Why nothing can be created at local ``path`` now, or None when it can.

    Found by creating (and at once removing) a temporary file in the nearest folder that
    exists at or above ``path``: permission bits alone miss read-only mounts, immutable
    folders, pseudo-filesystems such as /proc, and they say yes to root. Commands ask this
    before any compute, so a bad ``-o`` costs a second, not the whole job.
    """
    probe = existing_ancestor(path)
    if not os.path.isdir(probe):
        return f"{probe!r} is a file"
    try:
        handle, temporary = tempfile.mkstemp(prefix=".cdft-write-check.", dir=probe)
    except OSError as exc:
        return f"{probe!r} does not allow writing ({exc.strerror or one_line(exc)})"
    os.close(handle)
    os.unlink(temporary)
    return None


def atomic_write(destination: str, data: bytes, *, what: str = "file", make_parents: bool = False) -> None:
    """Write ``data`` to ``destination`` (a path or fsspec URL): a temporary sibling, then a rename.

    Local files get an ``fsync`` and the usual permissions (the umask applies); other
    filesystems a temporary name and ``mv``. ``make_parents`` creates missing folders;
    otherwise a missing folder is a usage error naming it. ``what`` names the file in errors.
    """
    from fsspec.core import url_to_fs
    from fsspec.implementations.local import LocalFileSystem

    try:
        fs, path = url_to_fs(str(destination))
    except (ImportError, ValueError) as exc:
        raise UsageError(f"cannot write {what} {destination!r}: {one_line(exc)}") from exc
    if isinstance(fs, LocalFileSystem):
        _write_local(data, path, destination, what, make_parents)
        return
    parent = path.rsplit("/", 1)[0]
    temporary = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        if make_parents and parent:
            fs.makedirs(parent, exist_ok=True)
        fs.pipe_file(temporary, data)
        fs.mv(temporary, path)
    except Exception as exc:
        try:
            if fs.exists(temporary):
                fs.rm(temporary)
        except Exception:  # cleanup is best effort; the original error is what matters
            pass
        raise CdftError(f"cannot write {what} {destination!r}: {one_line(exc)}") from exc


def as_new_file(path: str) -> None:
    """Give a ``tempfile.mkstemp`` file (always 0600) the mode an ordinary new file gets under
    the umask, before it is published: colleagues on a shared cluster can read the results."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _write_local(data: bytes, path: str, destination: str, what: str, make_parents: bool) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if make_parents:
        os.makedirs(folder, exist_ok=True)
    elif not os.path.isdir(folder):
        raise UsageError(f"cannot write {what} {destination!r}: folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"cannot write {what} {destination!r}: it is a folder; name a file")
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise CdftError(f"cannot write {what} {destination!r}: {one_line(exc)}") from exc
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        as_new_file(temporary)
        os.replace(temporary, path)
    except BaseException as exc:
        if os.path.exists(temporary):
            os.unlink(temporary)
        if isinstance(exc, OSError):
            raise CdftError(f"cannot write {what} {destination!r}: {one_line(exc)}") from exc
        raise
