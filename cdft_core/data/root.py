"""The data root: a local path or any fsspec URL, the files under it, and the one gate
(:meth:`DataRoot.confine`) every table path goes through.

A data root is a local path, ``file://``, ``memory://``, ``zip://FOLDER::/path/data.zip``
(fsspec's chained syntax: the folder inside the archive, then the archive) or any URL
whose filesystem package is installed (``s3://``, ``gs://``). Tables hold paths relative
to the root, so a split file can never make cdft read outside it. Imports no torch:
dataset plugins use it while ``cdft list`` runs.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cdft_core.errors import CdftError, UsageError
from cdft_core.text import one_line

if TYPE_CHECKING:
    import torch
    from fsspec import AbstractFileSystem

#: Extensions (lower case) treated as images when a dataset scans a root: the one list.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


@dataclass
class DataRoot:
    """A data root opened through fsspec: the filesystem and the root's path inside it."""

    url: str
    fs: AbstractFileSystem
    base: str

    @classmethod
    def open(cls, url: str, *, what: str = "data root") -> DataRoot:
        """Open ``url``; a root that does not exist or is not a folder is a usage error."""
        fs, base = open_url(str(url), what)
        shown = one_line(url, 120)
        base = base.rstrip("/") if base not in ("/", "") else base
        try:
            is_dir = fs.isdir(base) if base else True
        except OSError as exc:
            raise CdftError(f"cannot read {what} {shown!r}: {one_line(exc)}") from exc
        if not is_dir:
            reason = "is a file, not a folder" if fs.exists(base) else "does not exist"
            raise UsageError(f"{what} {shown!r} {reason}; pass the folder that holds the images")
        return cls(str(url), fs, base)

    # -- paths ------------------------------------------------------------------------
    def path(self, relative: str) -> str:
        """The filesystem path of a (confined) relative path."""
        if not self.base:
            return relative
        return f"{self.base}{relative}" if self.base.endswith("/") else f"{self.base}/{relative}"

    def relative(self, full: str) -> str:
        """Inverse of :meth:`path` for paths the filesystem lists under the root."""
        full = full.replace("\\", "/") if os.sep == "\\" else full
        prefix = (self.base.rstrip("/") + "/") if self.base else ""
        if self.base and not full.startswith(prefix):
            full = "/" + full.lstrip("/")  # some filesystems drop or add the leading slash
            prefix = "/" + prefix.lstrip("/")
        return full[len(prefix) :].lstrip("/")

    def confine(self, path: Any, where: str) -> str:
        """Normalise a table's ``image_path`` and refuse anything that leaves the root.

        Relative paths may not contain ``..``; absolute paths and URLs are refused
        unless the root is local and the absolute path lies inside it (then it is made
        relative). ``where`` names the CSV row for the error line (empty: the line
        names only the path).
        """
        at = f"{where}: " if where else ""
        text = "" if path is None else str(path).strip()
        if not text or text == "nan":
            what = f"{at}image_path is empty" if at else "a row has an empty image_path"
            raise UsageError(f"{what}; give the path of the image relative to the data root")
        if "://" in text or text.startswith(("/", "\\")) or _DRIVE.match(text):
            text = self._absolute_inside(text, at)
        parts = re.split(r"[\\/]", text)
        if ".." in parts:
            raise UsageError(f"{at}image_path {text!r} escapes the data root with '..'; use a path inside {self.url}")
        clean = posixpath.normpath("/".join(parts)).lstrip("/")
        if clean in ("", "."):
            raise UsageError(f"{at}image_path {text!r} names the data root itself, not an image")
        return clean

    def _absolute_inside(self, text: str, at: str) -> str:
        from fsspec.implementations.local import LocalFileSystem

        if isinstance(self.fs, LocalFileSystem) and "://" not in text:
            absolute = os.path.normpath(text)
            base = os.path.normpath(self.base)
            if absolute.startswith(base.rstrip(os.sep) + os.sep):
                return os.path.relpath(absolute, base).replace(os.sep, "/")
        raise UsageError(
            f"{at}image_path {text!r} is an absolute path outside the data root {self.url}; "
            f"write paths relative to the root"
        )

    # -- listing and reading ----------------------------------------------------------
    def files(self, extensions: Iterable[str] | None = IMAGE_EXTENSIONS) -> dict[str, int]:
        """Every file under the root (relative path -> size in bytes), optionally by extension."""
        from fsspec.implementations.local import LocalFileSystem

        try:
            if isinstance(self.fs, LocalFileSystem):
                found = self._local_files()
            else:
                found = {
                    self.relative(full): int(info.get("size") or 0)
                    for full, info in self.fs.find(self.base, detail=True).items()
                    if info.get("type", "file") == "file"
                }
        except OSError as exc:
            raise CdftError(f"cannot list data root {self.url!r}: {exc}") from exc
        wanted = tuple(e.lower() for e in extensions) if extensions is not None else None
        return dict(sorted((rel, size) for rel, size in found.items() if wanted is None or rel.lower().endswith(wanted)))

    def _local_files(self) -> dict[str, int]:
        """Files under a local root, following symbolic links.

        fsspec's ``find`` skips links, so a root made of links to the real images (common
        on shared clusters) looked empty or lost a class. A folder already visited (a link
        back up the tree) is not entered again.
        """

        def fail(exc: OSError) -> None:
            raise exc

        out: dict[str, int] = {}
        visited: set[str] = set()
        for folder, subfolders, names in os.walk(self.base, onerror=fail, followlinks=True):
            real = os.path.realpath(folder)
            if real in visited:
                subfolders[:] = []
                continue
            visited.add(real)
            for name in names:
                full = os.path.join(folder, name)
                try:
                    size = os.stat(full).st_size
                except FileNotFoundError:  # a dangling link: not a file; a table naming it reports it missing
                    continue
                out[os.path.relpath(full, self.base).replace(os.sep, "/")] = size
        return out

    def read_bytes(self, relative: str) -> bytes:
        """The bytes of one file; a missing file is a :class:`CdftError` naming it."""
        try:
            with self.fs.open(self.path(relative), "rb") as handle:
                return handle.read()
        except FileNotFoundError as exc:
            raise CdftError(
                f"image {relative!r} not found under data root {self.url}; fix the split file or the root"
            ) from exc
        except OSError as exc:
            raise CdftError(f"cannot read image {relative!r} under {self.url}: {exc}") from exc

    def read_image(self, relative: str) -> torch.Tensor:
        """One decoded image; a missing, unreadable or undecodable file is an :class:`ImageError`."""
        from cdft_core.data.images import decode_image

        try:
            return decode_image(self.read_bytes(relative), relative)
        except ImageError:
            raise
        except CdftError as exc:
            raise ImageError(str(exc)) from exc


class ImageError(CdftError):
    """An image of a table that cannot be read or decoded; the message names it.

    A DataLoader worker's exception comes back to the training process as
    ``type(exc)(text)``, where ``text`` is torch's "Caught ... Original Traceback" report;
    such a copy keeps only the original message, so the error stays one line.
    """

    def __init__(self, message: str) -> None:
        text = str(message)
        if text.startswith("Caught ") and "Original Traceback" in text:
            text = _original_message(text, type(self))
        super().__init__(text)


def _original_message(report: str, kind: type) -> str:
    """The message of the exception at the end of a formatted traceback (``module.Kind: message``)."""
    lines = [line for line in report.splitlines() if line.strip()]
    last = lines[-1] if lines else report
    for prefix in (f"{kind.__module__}.{kind.__qualname__}: ", f"{kind.__qualname__}: "):
        if last.startswith(prefix):
            return last[len(prefix):]
    return one_line(last)


#: fsspec protocols whose "file system" is one archive file (``zip://FOLDER::ARCHIVE``)
ARCHIVE_PROTOCOLS = ("zip", "tar", "libarchive")


def open_url(url: str, what: str) -> tuple[AbstractFileSystem, str]:
    """``fsspec.core.url_to_fs(url)`` with one-line usage errors naming ``what`` (``--data-root``...).

    Refused: an unknown protocol (or its package missing), a missing file or archive, an
    archive URL naming a folder, a file that is not an archive of the URL's kind (a CSV
    behind ``zip://``), and an archive with nothing in it.
    """
    from fsspec.core import url_to_fs

    shown = one_line(url, 120)
    protocol = url.split("://", 1)[0] if "://" in url else ""
    archive = url.rsplit("::", 1)[1] if protocol in ARCHIVE_PROTOCOLS and "::" in url else None
    kind = f"{protocol} archive"
    try:
        fs, path = url_to_fs(url)
    except (ImportError, ValueError) as exc:  # unknown protocol or its package missing
        raise UsageError(f"cannot open {what} {shown!r}: {one_line(exc)}") from exc
    except FileNotFoundError as exc:
        target = f"its archive {one_line(archive, 120)!r}" if archive else "it"
        raise UsageError(f"{what} {shown!r} does not exist ({target} is missing); check the path") from exc
    except IsADirectoryError as exc:
        raise UsageError(f"{what} {shown!r}: {one_line(archive or url, 120)!r} is a folder, not a {kind}; "
                         f"name the archive file, or pass the folder itself without {protocol}://") from exc
    except OSError as exc:
        raise CdftError(f"cannot read {what} {shown!r}: {one_line(exc)}") from exc
    except Exception as exc:  # zipfile.BadZipFile, tarfile.ReadError...: not an archive of that kind
        if archive is None:
            raise
        empty = "::" not in archive and os.path.isfile(archive) and os.path.getsize(archive) == 0
        problem = "is an empty file (0 bytes)" if empty else f"is not a {kind} ({one_line(exc, 120)})"
        raise UsageError(f"{what} {shown!r}: {one_line(archive, 120)!r} {problem}; pass a {kind} that holds the data") from exc
    if archive is not None:
        try:
            empty = not fs.ls("", detail=False)
        except OSError:
            empty = False  # the caller's own check reports it
        if empty:
            raise UsageError(f"{what} {shown!r}: the {kind} {one_line(archive, 120)!r} is empty; "
                             f"pass the archive that holds the data")
    return fs, path
