"""HCRF gastric histopathology (Sun et al. 2020): normal vs abnormal, the paper's low-data protocol.

Layout rule: an image's class is the nearest folder above it named like a class
(``normal`` / ``abnormal`` by default, matched case-insensitively; the ``normal`` and
``abnormal`` options rename them). Images are found recursively (png, jpg/jpeg,
tif/tiff, bmp, webp: ``cdft_core.IMAGE_EXTENSIONS``); files outside both class folders are
ignored. A class folder without an image (a misspelt ``--normal``, a folder of masks only)
is a usage error saying how many masks were skipped there.

Ground-truth masks are not inputs and are skipped: a file is a mask when its name
(without extension) or any folder between the data root and the file contains the
word ``gt``, ``mask``/``masks`` or ``groundtruth``/``ground truth``, separated by
``_ - . space`` or the ends (``img_GT.png``, ``masks/img.png``, ``GT/img.tif``). Words
that merely contain those letters (``gtx``, ``unmasked``) do not count.

Folds: the paper's shuffled, stratified 4-fold split (seed 1) on the sorted paths.
Default protocol ``low-data``: train on the one fold named as test fold, validate on
the validation fold, test on the two others; ``standard`` is available.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from cdft_core import IMAGE_EXTENSIONS, BaseDataset, CdftError, DatasetOption, UsageError, dataset_metadata, hookimpl

if TYPE_CHECKING:
    import pandas as pd

    from cdft_core import DataRoot

CLASSES = ("normal", "abnormal")
MASK_WORD = re.compile(r"(?:^|[\s_.\-])(?:gt|masks?|ground[\s_\-]?truth)(?:$|[\s_.\-])", re.IGNORECASE)

OPTIONS = (
    DatasetOption("normal", "name of the folder holding normal images (case-insensitive)", default="normal"),
    DatasetOption("abnormal", "name of the folder holding abnormal images (case-insensitive)", default="abnormal"),
)


def is_mask(parts: list[str]) -> bool:
    """Whether a file (its folders below the data root, then its name) is a ground-truth mask."""
    *folders, name = parts
    stem = name.rsplit(".", 1)[0]
    return any(MASK_WORD.search(part) for part in (*folders, stem))


class HCRF(BaseDataset):
    """HCRF with configurable class folder names (see the module docstring)."""

    name = "hcrf"
    classes = CLASSES
    default_folds = 4
    default_protocol = "low-data"
    group_column = None

    def __init__(self, normal: str = "normal", abnormal: str = "abnormal") -> None:
        self.folders = {normal.lower(): 0, abnormal.lower(): 1}
        self.names = (normal, abnormal)
        if len(self.folders) != 2:
            raise UsageError(
                f"--normal and --abnormal name the same folder {normal!r}; give two different folder names"
            )

    def scan(self, root: DataRoot) -> pd.DataFrame:
        import pandas as pd

        rows: list[dict[str, Any]] = []
        images, masks = 0, []
        masks_in = [0, 0]  # masks skipped inside each class's folders
        for path in root.files(extensions=IMAGE_EXTENSIONS):
            parts = path.split("/")
            images += 1
            # the nearest class folder above the file
            hits = [i for i, part in enumerate(parts[:-1]) if part.lower() in self.folders]
            label = self.folders[parts[hits[-1]].lower()] if hits else None
            if is_mask(parts):
                masks.append(path)
                if label is not None:
                    masks_in[label] += 1
                continue
            if label is not None:
                rows.append({"image_path": path, "label": label, "class_name": CLASSES[label]})
        if not rows:
            raise CdftError(self._nothing_found(root, images, masks))
        found = {row["label"] for row in rows}
        for label in (0, 1):
            if label not in found:
                raise UsageError(self._class_missing(root, label, masks_in[label]))
        return pd.DataFrame(rows)

    def _class_missing(self, root: DataRoot, label: int, masks: int) -> str:
        """One class without an image (a misspelt --normal, a folder of masks only): a
        one-class "HCRF" split would train and test on nothing of that class."""
        name, option = self.names[label], ("--normal", "--abnormal")[label]
        return (
            f"no {CLASSES[label]} image ({_extensions()}) in a folder named {name!r} under {root.url} "
            f"({masks} ground-truth mask(s) skipped there); name the folder holding the {CLASSES[label]} "
            f"images with {option} NAME, or pass the HCRF folder as the data root"
        )

    def _nothing_found(self, root: DataRoot, images: int, masks: list[str]) -> str:
        """Why a scan found no image: none at all, only masks (a root inside the ground truth), or no class folder."""
        if images and len(masks) == images:
            return (
                f"all {images} image files under {root.url} are ground-truth masks (gt, mask or groundtruth "
                f"in the file or folder name, e.g. {masks[0]!r}), so none was kept; point the data root at the "
                f"folder holding the original images"
            )
        names = " and ".join(repr(n) for n in self.folders)
        skipped = f" ({len(masks)} of its {images} image files are masks and were skipped)" if masks else ""
        if is_mask([root.url.rstrip("/").rsplit("/", 1)[-1], "image"]):
            skipped += " (the data root itself is named like a mask folder)"
        return (
            f"no HCRF images ({_extensions()}) in folders named {names} under {root.url}{skipped}; "
            f"pass the HCRF folder, or rename the class folders with --normal/--abnormal"
        )


def _extensions(sep: str = ", ") -> str:
    """``png, jpg, ...``: the extensions a scan reads, from the one list the data root uses."""
    return sep.join(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)


def make_hcrf(**options: str) -> HCRF:
    return HCRF(**options)


@hookimpl
def register_datasets(register):
    register(
        "hcrf",
        make_hcrf,
        description="HCRF gastric histology, normal vs abnormal; the paper's low-data protocol",
        metadata=dataset_metadata(
            HCRF,
            options=OPTIONS,
            layout=f"<root>/**/{{normal,abnormal}}/**/<image>.{{{_extensions(',')}}}; ground-truth masks (gt, mask) skipped",
        ),
    )
