"""The decode-once image cache: each image decoded and resized once, stored as ``uint8``,
memory-mapped by every process that trains or evaluates on it.

Why: both pipelines begin with the same deterministic resize
(:func:`cdft_core.data.transforms.split_resize`), and decoding is most of their cost
(a 700×460 PNG takes ~7 ms to decode, a 2048×2048 one ~90 ms, the augmentation of the
resized image ~2 ms). Every later epoch, stage, fold and run on the same data starts
from the stored resize, with the same tensors as decoding each time.

Layout: ``<cache dir>/images/<key>/`` holds ``images.npy`` (``N×3×H×W`` uint8, row *i*
is the *i*-th of the sorted image paths) and ``meta.json`` (the key's inputs, the paths,
the shape, the SHA-256 of ``images.npy``), written last. The cache dir is ``--cache-dir``,
else ``$CDFT_CACHE_DIR``, else the user's cache dir (``~/.cache/cdft``).

The key hashes the data root, each image's path and fingerprint, the resize (size,
interpolation, antialiasing), :data:`~cdft_core.data.images.DECODER_VERSION` and the
Pillow, torch and torchvision versions. A fingerprint is size and modification time
(local files: ``os.stat``); other filesystems give what their listing holds (a zip
member's CRC, an S3 ETag, a GCS md5, modification times), and a file whose listing has
neither is hashed. A changed image, size or interpolation gives a new key: a new cache,
never a stale one.

Building happens in a temporary folder, by a pool of threads (Pillow's decoders and
torch's resize release the GIL), then ``meta.json``, then one atomic rename. An
exclusive lock per key (``fcntl``; :mod:`cdft_core.data.cache_dir`) makes concurrent
builders (the ranks of a job, parallel runs) wait for the first one, so the cache is
built once; if that build fails (an unreadable image), they stop with its error rather
than try again. A shared lock held while a process has the cache open keeps
``cdft cache clear`` from removing it under a running job. Where nothing can be locked
(read-only or ``flock``-less cache dirs, NFS, Lustre) the cache still works, unlocked
(:mod:`cdft_core.data.cache_locks`). ``images.npy`` is given all its disk blocks before
anything is written: a full disk is a one-line error, never SIGBUS. The folders are
the user's own (``0o700``); another user's cache is never used.

Verification: every open (once per process, not per loader worker) checks the size of
``images.npy`` and its SHA-256 against ``meta.json``: one sequential read, about 0.8 s
per GB on one core (1.2 GB for BreakHis at 224 px). A truncated or corrupt cache is
rebuilt (moved aside, not deleted, while another process has it open); a file that
cannot be read (EIO, EMFILE) is an error instead. ``cdft eval`` (``build=False``) only
reuses: when the key cannot be computed (an image of another split gone), it decodes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdft_core.cpus import available_cpus
from cdft_core.data.cache_dir import MB, allocate, check_free_space, file_digest, images_dir, open_or_build
from cdft_core.data.root import DataRoot
from cdft_core.data.transforms import ResizeSpec
from cdft_core.errors import CdftError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import torch

    from cdft_core.data.cache_locks import Lock

#: Version of the layout above; part of the key.
FORMAT = 1
#: Listing fields that identify a file's content or its last change, by filesystem.
_FINGERPRINT_FIELDS = ("CRC", "ETag", "etag", "md5Hash", "crc32c", "content_md5", "mtime", "LastModified",
                       "last_modified", "updated", "modified", "date_time", "created")
_MORE_SPACE = "pass --cache-dir on a larger disk, or --no-cache"


class ImageCache:
    """An opened cache: the paths it holds and their rows, the array mapped on first use
    (:func:`open_cache` maps it at once).

    Forked DataLoader workers keep the parent's read-only mapping; pickled ones (spawn)
    map the file themselves. Either way the pages are the operating system's page cache,
    shared by every process: no copies.
    """

    def __init__(self, directory: Path, meta: Mapping[str, Any], spec: ResizeSpec, status: str,
                 in_use: Lock | None = None, seconds: float = 0.0) -> None:
        self.directory = str(directory)
        self.key = str(meta["key"])
        self.paths: list[str] = list(meta["paths"])
        self.spec = spec
        self.status = status  # "built", "built by another process" or "reused"
        self.nbytes = int(meta["file_bytes"])
        self.seconds = seconds
        self._index = {path: row for row, path in enumerate(self.paths)}
        self._mapped: np.ndarray | None = None
        self._in_use = in_use  # a shared lock: `cdft cache clear` leaves the cache alone while we hold it
        if in_use is not None:
            weakref.finalize(self, in_use.close)

    def __len__(self) -> int:
        return len(self.paths)

    def rows(self, paths: Sequence[str]) -> list[int]:
        """The row of each (confined) path; a path the cache does not hold is an error."""
        missing = [p for p in paths if p not in self._index]
        if missing:
            raise CdftError(f"the image cache {self.directory} does not hold {missing[0]!r} "
                            f"({len(missing)} paths missing); open it with every path the datasets read")
        return [self._index[p] for p in paths]

    def image(self, row: int) -> torch.Tensor:
        """The resized ``uint8 3×H×W`` image of a row (a copy: the mapping is read-only)."""
        import numpy as np
        import torch

        return torch.from_numpy(np.array(self._array()[row]))

    def _array(self) -> np.ndarray:
        if self._mapped is None:  # a forked loader worker keeps its parent's (read-only) mapping
            import numpy as np

            self._mapped = np.load(os.path.join(self.directory, "images.npy"), mmap_mode="r")
        return self._mapped

    def describe(self) -> str:
        """The one log line: what was found or built, its size and where it is."""
        took = f" in {self.seconds:.1f} s" if self.status == "built" else ""
        return (f"image cache {self.status}{took}: {len(self)} images {self.spec.height}x{self.spec.width} "
                f"{self.spec.interpolation}, {self.nbytes / MB:.1f} MB, {self.directory}")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_mapped"] = state["_in_use"] = None  # map again in the receiving process
        return state


def cache_for_tables(root: str, tables: Sequence[pd.DataFrame], data_config: Mapping[str, Any], *,
                     cache_dir: str | None = None, build: bool = True, progress: bool = False,
                     log: Callable[[str], None] | None = None) -> ImageCache | None:
    """One cache for every image the ``tables`` name (a run's train, val and test rows
    together), resized as ``data_config`` says; logs one line when ``log`` is given.

    ``build=False`` only reuses a cache that exists (``cdft eval``: one pass gains
    nothing from building one) and returns None otherwise, as for tables without rows.
    """
    paths = [path for table in tables for path in table["image_path"].tolist()]
    cache = open_cache(root, paths, ResizeSpec.from_data_config(data_config), cache_dir=cache_dir, build=build,
                       progress=progress, log=log)
    if cache is not None and log is not None:
        log(cache.describe())
    return cache


def open_cache(root: str, paths: Sequence[str], spec: ResizeSpec, *, cache_dir: str | None = None,
               build: bool = True, progress: bool = False, workers: int | None = None,
               log: Callable[[str], None] | None = None) -> ImageCache | None:
    """The verified cache of ``paths`` under ``root`` resized as ``spec``: reused, or built
    here (once, whatever the number of processes asking), or None without paths or when
    ``build`` is false and there is none."""
    data_root = DataRoot.open(root)
    paths = sorted({data_root.confine(p, "") for p in paths})
    if not paths:
        return None
    try:
        key, inputs = cache_key(data_root, paths, spec)
    except CdftError:
        if build:
            raise
        return None  # reuse only (cdft eval): an image missing from another split, or unreadable, is no error here

    def build_here(temporary: Path) -> dict[str, Any]:
        return _build(temporary, key, inputs, data_root.url, paths, spec, workers=workers, progress=progress)

    opened = open_or_build(images_dir(cache_dir), key, verify=lambda folder: _verified(folder, key),
                           build=build_here if build else None, what="image cache",
                           fix="pass another --cache-dir DIR, or --no-cache", log=log)
    if opened is None:
        return None
    cache = ImageCache(opened.directory, opened.meta, spec, opened.status, opened.in_use, opened.seconds)
    cache._array()  # mapped now (no reading), before loader workers fork: they keep this mapping
    return cache


def tables_key(root: str, tables: Sequence[pd.DataFrame], data_config: Mapping[str, Any]) -> str:
    """The key :func:`cache_for_tables` gives these tables' images, without opening or
    building anything: what the images are, for caches derived from them (the feature cache)."""
    data_root = DataRoot.open(root)
    paths = sorted({data_root.confine(p, "") for table in tables for p in table["image_path"].tolist()})
    return cache_key(data_root, paths, ResizeSpec.from_data_config(data_config))[0]


# -- the key ----------------------------------------------------------------------------
def cache_key(data_root: DataRoot, paths: Sequence[str], spec: ResizeSpec) -> tuple[str, dict[str, Any]]:
    """(key, the inputs it hashes) of sorted, confined ``paths`` (see the module docstring)."""
    import PIL
    import torch
    import torchvision

    from cdft_core.data.images import DECODER_VERSION

    files = hashlib.sha256()
    for path, fingerprint in zip(paths, _fingerprints(data_root, paths), strict=True):
        files.update(f"{path}\t{fingerprint}\n".encode())
    url = data_root.url if "://" in data_root.url or "::" in data_root.url else os.path.abspath(data_root.url)
    inputs = {"format": FORMAT, "root": url, "images": len(paths), "files": files.hexdigest(),
              "size": [spec.height, spec.width], "interpolation": spec.interpolation, "antialias": spec.antialias,
              "decoder": DECODER_VERSION, "pillow": PIL.__version__, "torch": torch.__version__,
              "torchvision": torchvision.__version__}
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]
    return key, inputs


def _fingerprints(data_root: DataRoot, paths: Sequence[str]) -> list[str]:
    """Size and modification time (or content hash) of each file, as one string each."""
    from fsspec.implementations.local import LocalFileSystem

    def missing(path: str) -> CdftError:
        return CdftError(f"image {path!r} not found under data root {data_root.url}; fix the split file or the root")

    out = []
    if isinstance(data_root.fs, LocalFileSystem):
        for path in paths:
            try:
                stat = os.stat(data_root.path(path))  # follows links, as reading does
            except (FileNotFoundError, NotADirectoryError):
                raise missing(path) from None
            except OSError as exc:
                raise CdftError(f"cannot read image {path!r} under data root {data_root.url}: {exc.strerror or exc}") from None
            out.append(f"{stat.st_size}:{stat.st_mtime_ns}")
        return out
    try:
        listing = {data_root.relative(full): info for full, info in data_root.fs.find(data_root.base, detail=True).items()}
    except OSError as exc:
        raise CdftError(f"cannot list data root {data_root.url!r}: {exc}") from exc
    for path in paths:
        info = listing.get(path)
        if info is None:
            raise missing(path)
        known = sorted((name, str(info[name])) for name in _FINGERPRINT_FIELDS if info.get(name) not in (None, ""))
        if known:
            out.append(json.dumps([info.get("size"), known]))
        else:  # nothing tells a change apart: the content itself
            out.append("sha256:" + hashlib.sha256(data_root.read_bytes(path)).hexdigest())
    return out


# -- verifying and building ---------------------------------------------------------------
def _verified(directory: Path, key: str) -> dict[str, Any] | None:
    """``meta.json`` of a complete, intact cache at ``directory``; None if absent, truncated or
    corrupt. Any other OSError (EIO, EMFILE: the cache may be fine) is raised."""
    import numpy as np

    try:
        meta = json.loads((directory / "meta.json").read_text())
        data = directory / "images.npy"
        if not isinstance(meta, dict) or meta.get("key") != key or data.stat().st_size != meta["file_bytes"]:
            return None
        array = np.load(data, mmap_mode="r")
        if array.dtype != np.uint8 or list(array.shape) != meta["shape"] or len(meta["paths"]) != array.shape[0]:
            return None
        del array
        return meta if file_digest(data) == meta["sha256"] else None
    except (FileNotFoundError, NotADirectoryError, EOFError, ValueError, KeyError, TypeError):
        return None


def _build(temporary: Path, key: str, inputs: dict[str, Any], root: str, paths: list[str], spec: ResizeSpec, *,
           workers: int | None, progress: bool) -> dict[str, Any]:
    """Decode and resize every image into ``temporary/images.npy``; returns the meta
    (:func:`~cdft_core.data.cache_dir.open_or_build` writes it and publishes the folder)."""
    import numpy as np

    shape = (len(paths), 3, spec.height, spec.width)
    check_free_space(temporary.parent, int(np.prod(shape)), "image cache", _MORE_SPACE)
    data = temporary / "images.npy"
    _fill(data, shape, root, paths, spec, workers=workers or min(32, available_cpus()), progress=progress)
    return {"key": key, **inputs, "shape": list(shape), "file_bytes": data.stat().st_size,
            "sha256": file_digest(data), "created": time.time(), "paths": paths}


def _fill(data: Path, shape: tuple[int, ...], root: str, paths: list[str], spec: ResizeSpec, *, workers: int,
          progress: bool) -> None:
    """Write row ``i`` of a new ``.npy`` file: image ``paths[i]`` decoded and resized."""
    import numpy as np
    import torch

    array = np.lib.format.open_memmap(data, mode="w+", dtype=np.uint8, shape=shape)
    allocate(data, "image cache", _MORE_SPACE)  # a full disk: an error now, not SIGBUS while writing
    resize = spec.transform()
    local = threading.local()

    def one(row: int) -> None:
        if not hasattr(local, "root"):
            local.root = DataRoot.open(root)  # one filesystem handle per thread (zip archives)
        array[row] = resize(local.root.read_image(paths[row])).numpy()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # parallel over images, not inside one resize: every thread (process-wide)
    try:
        _parallel(one, len(paths), workers, progress)
    finally:
        torch.set_num_threads(threads)
    array.flush()


def _parallel(work: Callable[[int], None], count: int, workers: int, progress: bool) -> None:
    """``work(i)`` for every ``i`` on a thread pool; the first failure stops the rest and is raised."""
    from tqdm import tqdm

    shown = progress and bool(getattr(sys.stderr, "isatty", lambda: False)())
    pool = ThreadPoolExecutor(max(1, min(workers, count)), thread_name_prefix="cdft-cache")
    with tqdm(total=count, desc="image cache", unit="img", disable=not shown, leave=False, dynamic_ncols=True) as bar:
        try:
            pending = {pool.submit(work, i) for i in range(count)}
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
                for future in done:
                    future.result()
                bar.update(len(done))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

