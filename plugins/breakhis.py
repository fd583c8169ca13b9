"""The BreakHis v1 dataset (Spanhol et al.): breast tumour histology at four magnifications.

Files are found anywhere under the root by their BreakHis name, e.g.
``SOB_M_DC-14-2523-200-001.png`` = procedure SOB, Malignant, type DC, year 14, slide
``2523``, 200X, image 1 (docs/method.md#breakhis). The class comes from the type code in the file name,
the patient from the slide id's number with any letter suffix removed
(``29960AB`` and ``29960CD`` are slides of patient 29960), never from the folder.

Options: ``task`` (``malignant-subtype``: DC, LC, MC, PC, the paper's task;
``benign-malignant``; ``subtype``: all 8 types), ``magnification`` and ``split``
(``patient``: folds grouped by patient, the default; ``image``: the paper's shuffled
image-level ``StratifiedKFold``, which leaks patients between folds). All three shape
the split file, so a run must use the ones its split file records; a file made with
``magnification=all`` can serve a run at one magnification (its rows are narrowed).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from cdft_core import (
    BaseDataset,
    CdftError,
    DatasetOption,
    dataset_metadata,
    hookimpl,
    stratified_folds,
    stratified_group_folds,
)

if TYPE_CHECKING:
    import pandas as pd

    from cdft_core import DataRoot

BENIGN = ("A", "F", "PT", "TA")
MALIGNANT = ("DC", "LC", "MC", "PC")
TASKS: dict[str, tuple[str, ...]] = {
    "malignant-subtype": MALIGNANT,
    "benign-malignant": ("benign", "malignant"),
    "subtype": BENIGN + MALIGNANT,
}
MAGNIFICATIONS = ("40X", "100X", "200X", "400X")
FILE_NAME = re.compile(
    r"^SOB_(?P<kind>[BM])_(?P<type>[A-Z]+)-(?P<year>\d+)-(?P<slide>(?P<patient>\d+)[A-Za-z]*)"
    r"-(?P<mag>\d+)-(?P<seq>\d+)\.png$",
    re.IGNORECASE,
)

OPTIONS = (
    DatasetOption(
        "task",
        "which labels: the paper's 4 malignant subtypes, benign vs malignant, or all 8 types",
        default="malignant-subtype",
        choices=tuple(TASKS),
    ),
    DatasetOption(
        "magnification",
        "keep images of one magnification, or all",
        default="200X",
        choices=(*MAGNIFICATIONS, "all"),
        filter_column="magnification",  # a split file made with `all` serves a run at one magnification
    ),
    DatasetOption(
        "split",
        "fold assignment: grouped by patient (no leakage) or the paper's image-level split",
        default="patient",
        choices=("patient", "image"),
    ),
)


class BreakHis(BaseDataset):
    """BreakHis with one task, magnification and split rule (see the module docstring)."""

    name = "breakhis"
    default_folds = 5
    default_protocol = "standard"
    group_column = "patient"  # reported (the leakage line) for both split rules

    def __init__(self, task: str = "malignant-subtype", magnification: str = "200X", split: str = "patient") -> None:
        self.task, self.magnification, self.split = task, magnification, split
        self.classes = TASKS[task]

    def label_of(self, kind: str, type_code: str) -> int | None:
        """The label of an image for this task, ``None`` when the task leaves it out."""
        if self.task == "benign-malignant":
            return 0 if kind == "B" else 1
        return self.classes.index(type_code) if type_code in self.classes else None

    def scan(self, root: DataRoot) -> pd.DataFrame:
        import pandas as pd

        rows: list[dict[str, Any]] = []
        named = 0
        for path in root.files(extensions=(".png",)):
            match = FILE_NAME.match(path.rsplit("/", 1)[-1])
            if match is None:
                continue
            named += 1
            kind, type_code = match["kind"].upper(), match["type"].upper()
            magnification = f"{int(match['mag'])}X"
            if self.magnification != "all" and magnification != self.magnification:
                continue
            label = self.label_of(kind, type_code)
            if label is None:
                continue
            rows.append(
                {
                    "image_path": path,
                    "label": label,
                    "class_name": self.classes[label],
                    "patient": match["patient"],
                    "slide": match["slide"],
                    "type": type_code,
                    "magnification": magnification,
                }
            )
        if not rows:
            if named == 0:
                raise CdftError(
                    f"no BreakHis images (SOB_<B|M>_<type>-<year>-<slide>-<mag>-<seq>.png) under {root.url}; "
                    f"pass the BreaKHis_v1 folder (the one holding histology_slides)"
                )
            raise CdftError(
                f"{named} BreakHis images under {root.url}, but none for task {self.task} at magnification "
                f"{self.magnification}; check --task and --magnification"
            )
        return pd.DataFrame(rows)

    def assign_folds(self, table: pd.DataFrame, folds: int, seed: int) -> list[int]:
        labels = table["label"].astype(int).tolist()
        if self.split == "image":
            return stratified_folds(labels, folds, seed)
        return stratified_group_folds(labels, table["patient"].astype(str).tolist(), folds, seed)


def make_breakhis(**options: str) -> BreakHis:
    return BreakHis(**options)


@hookimpl
def register_datasets(register):
    register(
        "breakhis",
        make_breakhis,
        description="BreakHis v1 breast histology, 4 magnifications; patient-level folds by default",
        metadata=dataset_metadata(
            BreakHis,
            classes={task: list(names) for task, names in TASKS.items()},
            options=OPTIONS,
            layout="BreaKHis_v1/histology_slides/breast/{benign,malignant}/SOB/<type>/<slide>/<mag>X/<file>.png",
        ),
    )
