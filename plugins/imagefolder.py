"""The generic ``imagefolder`` dataset: one folder per class directly under the data root.

``ROOT/<class>/**/<image>`` (png, jpg/jpeg, tif/tiff, bmp, webp; found recursively inside
each class folder; files directly in the root are ignored). Classes are the folder names
in sorted order, or the folders named by ``--classes a,b,c`` in that order (others are
left out). Folds: the shuffled, stratified image-level split; images are independent.

With a split file the class of each label is read from the ``class_name`` column or
else from the first folder of its ``image_path`` (the class folder).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cdft_core import (
    IMAGE_EXTENSIONS,
    BaseDataset,
    CdftError,
    DatasetOption,
    UsageError,
    class_names_from_table,
    dataset_metadata,
    hookimpl,
    split_names,
)

if TYPE_CHECKING:
    import pandas as pd

    from cdft_core import DataRoot

OPTIONS = (DatasetOption("classes", "class folders to use, in label order, comma-separated (default: all, sorted)"),)


class ImageFolder(BaseDataset):
    """Images in one folder per class (see the module docstring)."""

    name = "imagefolder"
    default_folds = 5
    group_column = None

    def __init__(self, classes: str | None = None) -> None:
        # no --classes: every class folder; BaseDataset reads a table's names from class_name
        self.classes = tuple(split_names(classes) or ())

    def classes_from_data(self, table: pd.DataFrame) -> list[str]:
        """A split file without ``class_name``: each label's class folder (first path part)."""
        folders = table.assign(class_name=table["image_path"].astype(str).str.split("/").str[0])
        return class_names_from_table(folders) or []

    def scan(self, root: DataRoot) -> pd.DataFrame:
        import pandas as pd

        by_folder: dict[str, list[str]] = {}
        for path in root.files(extensions=IMAGE_EXTENSIONS):
            if "/" in path:
                by_folder.setdefault(path.split("/", 1)[0], []).append(path)
        if not by_folder:
            raise CdftError(f"no images in class folders under {root.url}; expected ROOT/<class>/<image>.png")
        classes = self.classes or sorted(by_folder)
        absent = [c for c in classes if c not in by_folder]
        if absent:
            raise UsageError(
                f"--classes names folder(s) without images: {', '.join(absent)}; folders with images: {', '.join(sorted(by_folder))}"
            )
        rows = [
            {"image_path": path, "label": label, "class_name": name}
            for label, name in enumerate(classes)
            for path in by_folder[name]
        ]
        return pd.DataFrame(rows)


def make_imagefolder(**options: str) -> ImageFolder:
    return ImageFolder(**options)


@hookimpl
def register_datasets(register):
    register(
        "imagefolder",
        make_imagefolder,
        description="Your images in one folder per class (ROOT/<class>/...)",
        metadata=dataset_metadata(
            ImageFolder, classes="the class folder names, sorted (or --classes a,b,c)", options=OPTIONS
        ),
    )
