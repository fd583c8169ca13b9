"""Images: decoding, duplicate detection, and the torch Dataset over a split table.

Decoding returns RGB ``uint8`` tensors ``3×H×W`` (Pillow: PNG, JPEG and the TIFF that
HCRF uses).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from cdft_core.errors import CdftError
from cdft_core.text import one_line

if TYPE_CHECKING:
    import pandas as pd

from cdft_core.data.root import DataRoot


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
        raise CdftError(f"cannot decode image {name!r} ({one_line(exc)}); replace or remove the file") from exc
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


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
