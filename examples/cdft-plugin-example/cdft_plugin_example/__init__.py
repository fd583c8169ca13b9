"""An example third-party cdft plugin: one dataset, registered through the `cdft` entry point.

`example-tiles` reads PNG tiles named ``<patient>_<class>_<n>.png`` (classes ``stroma``
and ``tumour``) anywhere under the data root. It uses only cdft's public plugin API:
``cdft_core.hookimpl``, the ``register`` callable and the dataset base class; the core
does the rest (patient-grouped folds, validation, ``cdft prepare``, ``cdft run``).
"""

from __future__ import annotations

from cdft_core import BaseDataset, DatasetOption, dataset_metadata, hookimpl

CLASSES = ("stroma", "tumour")
OPTIONS = (
    DatasetOption("extension", "which image files to read", default=".png", choices=(".png", ".jpg")),
)


class ExampleTiles(BaseDataset):
    """Tiles whose file name carries the patient and the class."""

    name = "example-tiles"
    classes = CLASSES
    default_folds = 3
    group_column = "patient"  # folds keep each patient whole

    def __init__(self, extension: str = ".png") -> None:
        self.extension = extension

    def scan(self, root):
        import pandas as pd  # heavy imports stay inside the factory's methods

        rows = []
        for path in root.files(extensions=(self.extension,)):
            name = path.rpartition("/")[2]
            parts = name.split("_")
            if len(parts) >= 3 and parts[1] in CLASSES:
                rows.append({"image_path": path, "label": CLASSES.index(parts[1]), "patient": parts[0]})
        return pd.DataFrame(rows, columns=["image_path", "label", "patient"])


@hookimpl
def register_datasets(register):
    register(
        "example-tiles",
        ExampleTiles,
        description="Example plugin: tiles named <patient>_<class>_<n>.png (stroma / tumour)",
        metadata=dataset_metadata(ExampleTiles, options=OPTIONS),
    )
