"""Image files under a data root (any fsspec URL), their decoding, and the torch Dataset.

A data root is a local path, ``file://``, ``memory://``, ``zip://FOLDER::/path/data.zip``
(fsspec's chained syntax: the folder inside the archive, then the archive) or any URL
whose filesystem package is installed (``s3://``, ``gs://``). Tables hold paths relative
to the root; :meth:`DataRoot.confine` is the one gate every such path goes through, so a
split file can never make cdft read outside the root.

Decoding returns RGB ``uint8`` tensors ``3×H×W`` (Pillow: PNG, JPEG and the TIFF that
HCRF uses).
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from cdft_core.errors import CdftError, UsageError

if TYPE_CHECKING:
    import pandas as pd
    from fsspec import AbstractFileSystem

#: Extensions (lower case) treated as images when a dataset scans a root.
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
        from fsspec.core import url_to_fs

        try:
            fs, base = url_to_fs(str(url))
        except (ImportError, ValueError) as exc:  # unknown protocol or its package missing
            raise UsageError(f"cannot open {what} {url!r}: {exc}") from exc
        except FileNotFoundError as exc:  # e.g. the zip archive of a zip:// URL
            raise UsageError(f"{what} {url!r} does not exist ({exc}); check the path") from exc
        base = base.rstrip("/") if base not in ("/", "") else base
        try:
            is_dir = fs.isdir(base) if base else True
        except OSError as exc:
            raise CdftError(f"cannot read {what} {url!r}: {exc}") from exc
        if not is_dir:
            reason = "is a file, not a folder" if fs.exists(base) else "does not exist"
            raise UsageError(f"{what} {url!r} {reason}; pass the folder that holds the images")
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
        return decode_image(self.read_bytes(relative), relative)


def decode_image(data: bytes, name: str = "image") -> torch.Tensor:
    """Decode encoded image bytes to an RGB ``uint8`` tensor of shape ``3×H×W``.

    Pillow decodes every format the datasets use (PNG, JPEG, TIFF); torchvision's own
    decoders are deprecated since torchvision 0.29 and cannot read TIFF.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise CdftError(f"cannot decode image {name!r}: the file is empty; replace or remove it")
    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB"))
    except UnidentifiedImageError as exc:  # its message is the repr of our BytesIO: say what it means
        raise CdftError(f"cannot decode image {name!r} (not an image format Pillow reads); replace or remove the file") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise CdftError(f"cannot decode image {name!r} ({_first_line(exc)}); replace or remove the file") from exc
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def find_duplicates(root: DataRoot, paths: Sequence[str], sizes: dict[str, int] | None = None) -> list[list[str]]:
    """Groups of byte-identical files among ``paths`` (each group sorted, groups sorted).

    Only files that share their size with another are read and hashed, so a dataset
    without duplicates costs one listing, not a full read.
    """
    sizes = sizes if sizes is not None else root.files(extensions=None)
    by_size: dict[int, list[str]] = {}
    for path in dict.fromkeys(paths):  # a path listed twice is not a duplicate file
        by_size.setdefault(sizes.get(path, -1), []).append(path)
    groups: dict[str, list[str]] = {}
    for size, same in by_size.items():
        if len(same) < 2 or size < 0:
            continue
        for path in same:
            digest = hashlib.sha256(root.read_bytes(path)).hexdigest()
            groups.setdefault(digest, []).append(path)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


class ImageDataset(torch.utils.data.Dataset):
    """Rows of a split table as ``(transform(image), label)`` pairs.

    The filesystem is opened lazily in each process (DataLoader workers included), so a
    zip archive's file handle is never shared between forked workers.
    """

    def __init__(self, root: str, table: pd.DataFrame, transform: Callable[[torch.Tensor], Any] | None) -> None:
        self.root = str(root)
        probe = DataRoot.open(self.root)
        self.paths = [probe.confine(p, f"row {i}") for i, p in enumerate(table["image_path"].tolist())]
        self.labels = [int(v) for v in table["label"].tolist()]
        self.transform = transform
        self._opened: tuple[int, DataRoot] | None = (os.getpid(), probe)

    def __len__(self) -> int:
        return len(self.paths)

    def _data_root(self) -> DataRoot:
        if self._opened is None or self._opened[0] != os.getpid():
            self._opened = (os.getpid(), DataRoot.open(self.root))
        return self._opened[1]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self._data_root().read_image(self.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_opened"] = None  # reopen in the receiving process
        return state
