"""The images a command is asked about: files, folders, glob patterns, CSV lists and URLs.

``cdft predict``/``embed``/``explain`` take any mix of INPUT arguments and turn them into
one ordered list of :class:`InputImage`, each read through fsspec so that local paths,
``s3://``, ``memory://`` and ``zip://`` all behave alike. ``predict`` and ``embed`` keep every
row the user gave, repeats included (an image in a folder and named again, or listed in two
CSV rows with other columns): their outputs promise one row per input row, and a CSV row's
columns (its ``--group-by`` group) belong to that row; :func:`distinct_images` lets them read
and run a repeated image once. ``explain`` writes one overlay per image, so it drops repeats
(first occurrence kept). The arguments:

- an image file (any extension: the user named it);
- a folder: every image under it (:data:`~cdft_core.data.root.IMAGE_EXTENSIONS`,
  recursively, sorted), through :class:`~cdft_core.data.root.DataRoot` (links followed);
- a glob pattern (``*``, ``?``, ``[``; ``**`` recurses), local or behind a URL; an
  argument that exists is taken as that file or folder first, so names holding these
  characters work;
- a ``.csv`` file with an ``image_path`` column: paths relative to the CSV's folder (or
  absolute); the row's other columns travel with the image (``--group-by column:NAME``).

An argument that names nothing is a usage error (a typo should not yield an empty
table); an image that cannot be *read* is not an error here: the reader reports it per
image (:func:`read_image`), so one bad file never hides the others.
"""

from __future__ import annotations

import glob
import os
import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cdft_core.data.root import IMAGE_EXTENSIONS, DataRoot, open_url
from cdft_core.errors import CdftError, UsageError
from cdft_core.text import one_line

_GLOB = ("*", "?", "[")


@dataclass(frozen=True)
class InputImage:
    """One image to read: ``path`` as shown in outputs (the argument's spelling, or a URL),
    and the columns of its CSV row (empty for other inputs)."""

    path: str
    columns: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


def collect_inputs(arguments: Sequence[str], *, keep_repeats: bool = False) -> list[InputImage]:
    """Every image the INPUT arguments name, in argument order; a repeated path only once
    unless ``keep_repeats`` (predict, embed: one output row per input row)."""
    if not arguments:
        raise UsageError("no INPUT given; pass image files, folders, glob patterns or a CSV with an image_path column")
    seen: set[str] = set()
    images: list[InputImage] = []
    for argument in arguments:
        for image in _expand(str(argument)):
            if keep_repeats or image.path not in seen:
                seen.add(image.path)
                images.append(image)
    if not images:
        raise UsageError(f"no images found in {', '.join(map(repr, arguments))}")
    return images


def distinct_images(images: Sequence[InputImage]) -> tuple[list[InputImage], list[int]]:
    """The distinct paths of ``images`` (first occurrence) and, per input row, the index of its
    path among them: a repeated image is decoded and run once, and its result reused per row."""
    first: dict[str, int] = {}
    distinct: list[InputImage] = []
    for image in images:
        if image.path not in first:
            first[image.path] = len(distinct)
            distinct.append(image)
    return distinct, [first[image.path] for image in images]


def _expand(argument: str) -> Iterable[InputImage]:
    fs, path = open_url(argument, "INPUT")
    try:  # an existing path is that file or folder, even when its name holds * ? or [
        is_dir = fs.isdir(path)
        exists = is_dir or fs.exists(path)
    except OSError as exc:
        raise CdftError(f"cannot read INPUT {one_line(argument, 120)!r}: {one_line(exc)}") from exc
    named_csv = _split_url(argument)[1].lower().endswith(".csv")  # a CSV inside a zip:// chain too
    if named_csv and (exists or not any(c in argument for c in _GLOB)) and not is_dir:
        return _from_csv(argument)
    if not exists and any(c in argument for c in _GLOB):
        if "://" in argument:
            files = [_member(argument, fs, m) for m in sorted(fs.glob(path)) if not fs.isdir(m)]
        else:  # Python's glob keeps the user's spelling (relative stays relative)
            files = [m for m in sorted(glob.glob(argument, recursive=True)) if not os.path.isdir(m)]
        if not files:
            raise UsageError(f"INPUT pattern {one_line(argument, 120)!r} matches no files")
        return [InputImage(m) for m in files]
    if not exists:
        raise UsageError(f"INPUT {one_line(argument, 120)!r} does not exist; pass image files, folders, "
                         f"glob patterns or a CSV with an image_path column")
    if is_dir:
        root = DataRoot.open(argument, what="INPUT folder")
        found = root.files(IMAGE_EXTENSIONS)
        if not found:
            raise UsageError(f"INPUT folder {one_line(argument, 120)!r} holds no images "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
        return [InputImage(_join(argument, relative)) for relative in found]
    return [InputImage(argument)]


def _split_url(url: str) -> tuple[str, str, str]:
    """(``proto://`` or "", the path inside it, ``::chain`` or ""): a chained fsspec URL
    (``zip://tiles::/data/x.zip``) names a member before its ``::``, where a join must go."""
    head, sep, chain = url.partition("::")
    prefix, marker, inner = head.partition("://")
    if not marker:
        return "", head, sep + chain
    return prefix + marker, inner, sep + chain


def _join(base: str, relative: str) -> str:
    prefix, inner, chain = _split_url(base)
    inner = inner.rstrip("/")
    return prefix + (f"{inner}/{relative}" if inner else relative) + chain


def _parent(url: str) -> str:
    """The folder of a file's URL or path ("" for a bare local file name)."""
    prefix, inner, chain = _split_url(url)
    folder = inner.rsplit("/", 1)[0] if "/" in inner else ""
    return prefix + folder + chain if (folder or prefix) else ""


def _member(argument: str, fs: Any, path: str) -> str:
    """The URL of ``path`` (from ``fs.glob``) spelt like ``argument``, its chain kept."""
    prefix, _, chain = _split_url(argument)
    return prefix + path + chain if chain else fs.unstrip_protocol(path)


def _from_csv(argument: str) -> list[InputImage]:
    """The rows of a CSV list; ``image_path`` relative to the CSV's folder unless absolute or a URL."""
    import csv
    import io

    fs, path = open_url(argument, "INPUT CSV")
    try:
        with fs.open(path, "rb") as handle:
            text = handle.read().decode("utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"INPUT CSV {one_line(argument, 120)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CdftError(f"cannot read INPUT CSV {one_line(argument, 120)!r}: {one_line(exc)}") from exc
    reader = csv.DictReader(io.StringIO(text))
    if "image_path" not in (reader.fieldnames or []):
        raise UsageError(f"INPUT CSV {one_line(argument, 120)!r} has no image_path column "
                         f"(its columns: {', '.join(reader.fieldnames or []) or 'none'})")
    folder = _parent(argument)
    images = []
    for number, row in enumerate(reader, start=2):
        value = (row.get("image_path") or "").strip()
        if not value:
            raise UsageError(f"INPUT CSV {one_line(argument, 120)!r} line {number}: image_path is empty")
        if "://" in value or posixpath.isabs(value) or not folder:
            shown = value
        else:
            shown = _join(folder, value)
        images.append(InputImage(shown, {k: "" if v is None else str(v) for k, v in row.items() if k is not None}))
    if not images:
        raise UsageError(f"INPUT CSV {one_line(argument, 120)!r} lists no images")
    return images


def read_image(path: str) -> Any:
    """The decoded image (RGB ``uint8`` 3×H×W) at ``path`` (a local path or URL).

    A missing, unreadable or undecodable file raises :class:`CdftError` with a one-line
    reason that the caller lists next to the image.
    """
    import fsspec

    from cdft_core.data.images import decode_image

    try:
        with fsspec.open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise CdftError("file not found") from None
    except (OSError, ValueError) as exc:
        raise CdftError(f"cannot read the file ({one_line(exc)})") from exc
    return decode_image(data, path)


def check_output(output: str, what: str = "output") -> None:
    """A usage error now (before any model is loaded) when local ``output`` cannot be written:
    its folder does not exist or takes no new file, or it is itself a folder. URLs are
    checked when written."""
    from cdft_core.files import unwritable_reason

    if "://" in output or "::" in output:
        return
    folder = os.path.dirname(os.path.abspath(output))
    if os.path.isdir(output):
        raise UsageError(f"cannot write {what} {one_line(output, 120)!r}: it is a folder; name a file")
    if not os.path.isdir(folder):
        raise UsageError(f"cannot write {what} {one_line(output, 120)!r}: folder {one_line(folder, 120)!r} does not exist")
    reason = unwritable_reason(folder)
    if reason:
        raise UsageError(f"cannot write {what} {one_line(output, 120)!r}: {reason}; choose another place")
