"""Images: decoding, duplicate detection, and the torch Dataset over a split table.

Decoding returns RGB ``uint8`` tensors ``3×H×W`` (Pillow: PNG, JPEG and the TIFF that
HCRF uses).
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from cdft_core.data.root import DataRoot
from cdft_core.errors import CdftError
from cdft_core.text import one_line

if TYPE_CHECKING:
    import pandas as pd

    from cdft_core.data.image_cache import ImageCache

#: Bump whenever :func:`decode_image` may return other pixels for the same bytes: it is
#: part of the image cache's key, so cached images never outlive the decoder that made them.
DECODER_VERSION = 1


def decode_image(data: bytes, name: str = "image") -> torch.Tensor:
    """Decode encoded image bytes to an RGB ``uint8`` tensor of shape ``3×H×W``.

    Pillow decodes every format the datasets use (PNG, JPEG, TIFF); torchvision's own
    decoders are deprecated since torchvision 0.29 and cannot read TIFF.

    Every mode keeps its range: black stays 0 and the format's full scale becomes 255.

    * ``RGB``, ``L``: as stored. ``L`` (and any greyscale) is repeated into R, G and B.
    * 16-bit samples (greyscale ``I;16``/``I;16B``/``I``, 16-bit RGB(A) and grey+alpha
      PNG, 16-bit RGB(A)/CMYK TIFF) are scaled by their bit depth,
      ``round(value * 255 / (2**bits - 1))``, never clipped at 255 (a 16-bit ramp must not
      come out white). ``bits`` is the TIFF's BitsPerSample when it has one (a 12-bit TIFF
      uses 4095; a signed one 2**(bits-1)-1, negatives clip to 0), else 16; a wider
      integer image (``I`` from a 32-bit TIFF) is taken on the 16-bit scale, the range of
      the sensors such files hold, and values beyond it clip. Pillow keeps only the high
      byte of multi-band 16-bit samples (a truncation, not a rounding), so those are
      decoded a second time for their low bytes.
    * ``F`` (float TIFF): when no finite value exceeds 1.0 the image is taken as 0..1
      intensities (the float convention) and scaled by 255; otherwise it is on Pillow's
      0..255 scale. Either way the result is rounded and clipped to 0..255; NaN is 0.
    * ``P``: expanded through its palette (with or without transparency).
    * ``1``: 0 and 255.
    * ``CMYK`` (JPEG, TIFF): Pillow's ``CMYK``→``RGB`` formula (Adobe-inverted JPEGs
      are un-inverted on open); embedded ICC profiles are not applied.
    * Alpha (``RGBA``, ``LA``, ``PA``, a palette's transparency) is discarded, not
      composited: each pixel keeps the colour it stores. Compositing on black would turn
      a transparent border or a half-transparent mask into dark tissue-like pixels and
      make the same slide decode differently with and without its alpha channel. It is
      also what ``Image.convert("RGB")`` does, so opaque RGBA files decode as before.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise CdftError(f"cannot decode image {name!r}: the file is empty; replace or remove it")
    try:
        # Pillow's bomb limit stays (an error past 2 x MAX_IMAGE_PIXELS, ~179M pixels); its warning
        # below that (a large but real tile) would print its own two raw lines
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                array = _rgb_array(image, data)
    except UnidentifiedImageError as exc:  # its message is the repr of our BytesIO: say what it means
        raise CdftError(f"cannot decode image {name!r} (not an image format Pillow reads); replace or remove the file") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise CdftError(f"cannot decode image {name!r} ({one_line(exc)}); replace or remove the file") from exc
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _rgb_array(image: Any, data: bytes) -> Any:
    """An opened (not yet loaded) Pillow image as an ``H×W×3`` ``uint8`` array (rules in
    :func:`decode_image`); ``data`` is its encoded bytes, for a second decode."""
    import numpy as np
    from PIL import Image

    mode = image.mode
    _native_libtiff_order(image)
    tiles = list(image.tile or ())  # read before loading, which empties it
    if mode == "I" or mode.startswith("I;16"):
        grey = _to_eight_bits(np.asarray(image), _integer_peak(image))
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        scale = 255.0 if finite.size == 0 or float(finite.max()) <= 1.0 else 1.0
        values = np.nan_to_num(values, nan=0.0) * scale
        grey = np.clip(np.floor(values + 0.5), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in ("RGB", "RGBA", "CMYK"):
        wide = _sixteen_bit_samples(image, data, tiles)
        if wide is not None:
            eight = _to_eight_bits(wide, 65535)
            if mode == "CMYK":
                cmyk = Image.frombytes("CMYK", (eight.shape[1], eight.shape[0]), eight.tobytes())
                return np.asarray(cmyk.convert("RGB"))
            if eight.shape[2] == 1:  # grey (+ alpha, dropped)
                return np.repeat(eight, 3, axis=2)
            return eight[..., :3]  # alpha (or padding) dropped
    if mode in ("P", "PA"):  # via RGBA: Pillow warns on P->RGB when the transparency is per entry
        return np.asarray(image.convert("RGBA"))[..., :3]
    return np.asarray(image.convert("RGB"))


def _to_eight_bits(values: Any, peak: int) -> Any:
    """Integer samples on ``0..peak`` as ``uint8``: ``round(v * 255 / peak)``, exact
    integer arithmetic (``peak`` is odd, so there are no ties); out-of-range values clip."""
    import numpy as np

    wide = np.clip(values.astype(np.int64), 0, peak)
    return ((wide * 510 + peak) // (2 * peak)).astype(np.uint8)


def _integer_peak(image: Any) -> int:
    """Full scale of an integer greyscale image: from a TIFF's BitsPerSample and
    SampleFormat when present, else 16 bits unsigned; never more than 16 bits."""
    bits, signed = 16, False
    tags = getattr(image, "tag_v2", None)
    if tags is not None:
        declared = tags.get(258)  # BitsPerSample
        if isinstance(declared, tuple):
            declared = declared[0] if declared else None
        if isinstance(declared, int) and 0 < declared <= 16:
            bits = declared
            sample_format = tags.get(339)  # SampleFormat: 2 is signed integer
            if isinstance(sample_format, tuple):
                sample_format = sample_format[0] if sample_format else None
            signed = sample_format == 2
    return 2 ** (bits - 1) - 1 if signed and bits > 1 else 2**bits - 1


def _native_libtiff_order(image: Any) -> None:
    """Read a compressed big-endian signed or float TIFF in native byte order.

    libtiff hands Pillow samples in the machine's byte order; Pillow rewrites the raw
    mode to say so for ``;16B``/``;16L`` only, so ``I;16BS``, ``I;32BS`` and ``F;32BF``
    (ImageJ and most Java/Mac writers are big-endian) would come out byte-swapped.
    """
    import re

    tiles = list(image.tile or ())
    if not any(tile[0] == "libtiff" for tile in tiles):
        return
    fixed = []
    for tile in tiles:
        rawmode = _tile_rawmode(tile)
        match = re.fullmatch(r"([IF];(?:16|32|64))B([SF])", rawmode or "") if tile[0] == "libtiff" else None
        fixed.append(_with_rawmode(tile, f"{match[1]}N{match[2]}") if match else tile)
    image.tile = fixed


def _paired_byte_orders() -> dict[str, str]:
    """Pillow raw modes of 16-bit multi-band samples -> the raw mode that reads the other
    byte of each sample (``N`` is the machine's order)."""
    import sys

    native = "L" if sys.byteorder == "little" else "B"
    other = {"B": "L", "L": "B", "N": "B" if native == "L" else "L"}
    bases = ("RGB", "RGBA", "RGBX", "CMYK")
    return {f"{base};16{order}": f"{base};16{swapped}" for base in bases for order, swapped in other.items()}


def _sixteen_bit_samples(image: Any, data: bytes, tiles: list[Any]) -> Any:
    """The full 16-bit samples (``H×W×bands`` integers) of a multi-band 16-bit image,
    or None when it is not one (or this Pillow cannot read the other byte).

    Pillow stores such images 8 bits a band by keeping each sample's high byte; decoding
    the file again with the opposite byte order yields the low bytes. A 16-bit grey+alpha
    PNG is unpacked into RGBA with its high bytes only, so it is decoded again as plain
    8-bit RGBA, whose four bytes are grey high, grey low, alpha high, alpha low.
    """
    import numpy as np

    rawmodes = {_tile_rawmode(tile) for tile in tiles}
    if len(rawmodes) != 1:
        return None
    (rawmode,) = rawmodes
    if rawmode == "LA;16B":
        both = _decode_as(data, "RGBA")
        if both is None:
            return None
        both = both.astype(np.uint16)
        return ((both[..., 0] << 8) | both[..., 1])[..., None]
    partner = _paired_byte_orders().get(rawmode or "")
    if partner is None:
        return None
    high = np.asarray(image).astype(np.uint16)
    low = _decode_as(data, partner)
    if low is None or low.shape != high.shape:
        return None
    return (high << 8) | low.astype(np.uint16)


def _tile_rawmode(tile: Any) -> str | None:
    """A Pillow tile's raw mode (``(codec, extents, offset, args)``), None if it has none."""
    try:
        args = tile[3]
    except (IndexError, TypeError):
        return None
    if isinstance(args, str):
        return args
    return args[0] if isinstance(args, tuple) and args and isinstance(args[0], str) else None


def _with_rawmode(tile: Any, rawmode: str) -> Any:
    args = tile[3]
    args = rawmode if isinstance(args, str) else (rawmode, *args[1:])
    return tile._replace(args=args) if hasattr(tile, "_replace") else (*tile[:3], args)


def _decode_as(data: bytes, rawmode: str) -> Any:
    """Decode ``data`` again with every tile's raw mode replaced; None if Pillow cannot."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as again:
            again.tile = [_with_rawmode(tile, rawmode) for tile in again.tile]
            return np.asarray(again)
    except (OSError, ValueError):
        return None


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

    With an image ``cache`` (:mod:`cdft_core.data.image_cache`), ``transform`` must begin
    with the resize the cache was built with (:func:`~cdft_core.data.transforms.split_resize`
    checks it); each image then comes resized from the cache and only the steps after the
    resize run, which gives the same tensors as decoding and resizing it here.
    """

    def __init__(self, root: str, table: pd.DataFrame, transform: Callable[[torch.Tensor], Any] | None,
                 cache: ImageCache | None = None) -> None:
        self.root = str(root)
        probe = DataRoot.open(self.root)
        self.paths = [probe.confine(p, f"row {i}") for i, p in enumerate(table["image_path"].tolist())]
        self.labels = [int(v) for v in table["label"].tolist()]
        self.transform = transform
        self.cache = cache
        self._cache_rows: list[int] = []
        if cache is not None:
            from cdft_core.data.transforms import split_resize

            spec, self._after_resize = split_resize(transform)
            if spec != cache.spec:
                raise CdftError(f"the image cache {cache.directory} holds images resized as {cache.spec}, but this "
                                f"transform resizes as {spec}; open the cache with the transform's resize")
            self._cache_rows = cache.rows(self.paths)
        self._opened: tuple[int, DataRoot] | None = (os.getpid(), probe)

    def __len__(self) -> int:
        return len(self.paths)

    def _data_root(self) -> DataRoot:
        if self._opened is None or self._opened[0] != os.getpid():
            self._opened = (os.getpid(), DataRoot.open(self.root))
        return self._opened[1]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if self.cache is not None:
            return self._after_resize(self.cache.image(self._cache_rows[index])), self.labels[index]
        image = self._data_root().read_image(self.paths[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_opened"] = None  # reopen in the receiving process
        return state
