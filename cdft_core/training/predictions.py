"""Per-image predictions of each stage's best weights (``predictions.csv``), and how a run
evaluates its validation and test splits (the stage's loader, the split's patients).

Why a file: the metrics summarise a split in a few numbers; the table of every image's
prediction lets one see which images and patients fail, recompute any figure (patient
level included) and compare runs image by image, without re-running a model.

``<run dir>/stage<i>-<name>/predictions.csv`` is written by rank 0 when the stage completes,
after its test evaluation, from its best-validation weights. One row per image of the
validation split, then of the test split, in split-table order; the columns, in order:

- ``split``: ``val`` or ``test``;
- ``image_path``: relative to the data root, as in the split table;
- ``group``: the image's patient (the dataset's group column) as text; empty when the
  dataset has none;
- ``label``, ``label_name``: the true class (index, name);
- ``predicted``, ``predicted_name``: ``argmax`` of the probabilities (index, name);
- ``prob_<class name>``: one softmax probability per class, in class-index order,
  written with ``repr`` (every digit of the float32 value the metrics used).

The validation rows come from evaluating the validation split once more, at the end of
the stage, with the best weights loaded — rather than keeping the best epoch's outputs in
memory — because that also holds for a stage completed after ``--resume`` (the outputs of
an epoch before the interruption are gone). The weights, the loader and (in a frozen
stage) the stored features are those of the best epoch's evaluation, so on CPU the rows
give exactly its metrics; on CUDA, kernels that are not deterministic can move the last
digits.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cdft_core.errors import CdftError
from cdft_core.training.evaluation import Predictions, eval_batch_size, eval_loader, evaluate, predict
from cdft_core.training.records import stage_dir

if TYPE_CHECKING:
    from cdft_core.training.state import Run

#: the evaluation splits a stage writes, in file order
SPLITS: tuple[str, ...] = ("val", "test")
FILE = "predictions.csv"


def split_loader(run: Run, name: str) -> Any:
    """The run's loader of its val or test split, built at first use and kept (persistent workers);
    in a frozen stage, its stored features in the same batches (:mod:`cdft_core.training.frozen`)."""
    stored = run.features.eval_loader(name) if run.features is not None else None
    if stored is not None:
        return stored
    dataset = getattr(run.data, name)
    return run.loaders.get(name, lambda: eval_loader(dataset, run.dist, eval_batch_size(run.config),
                                                     run.config.num_workers, persistent=True))


def evaluate_split(run: Run, name: str, description: str) -> dict[str, Any]:
    """The metrics of the model now on split ``name``, patient-level ones included when it has patients."""
    return evaluate(run.model, getattr(run.data, name), run.splits.classes, run.dist, eval_batch_size(run.config),
                    run.config.num_workers, run.precision, description=description, loader=split_loader(run, name),
                    groups=run.splits.groups(name))


def best_predictions(run: Run, index: int) -> dict[str, Predictions]:
    """The predictions of the model now (the stage's best weights, loaded) on val and test."""
    where = f"stage {index + 1}/{len(run.strategy.stages)}"
    return {name: predict(run.model, getattr(run.data, name), run.splits.classes, run.dist, eval_batch_size(run.config),
                          run.config.num_workers, run.precision, description=f"{where} {name}",
                          loader=split_loader(run, name))
            for name in SPLITS}


def predictions_csv(classes: Sequence[str], parts: Sequence[tuple[str, Sequence[str], Sequence[str] | None,
                                                                  Predictions]]) -> str:
    """The text of ``predictions.csv`` (columns in the module docstring).

    ``parts``: per split, ``(split name, image paths, groups or None, predictions)``, the
    paths and groups in the order of the predictions (the split table's rows).
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["split", "image_path", "group", "label", "label_name", "predicted", "predicted_name",
                     *(f"prob_{name}" for name in classes)])
    for split, paths, groups, predictions in parts:
        probs = predictions.probabilities()
        labels = predictions.labels.tolist()
        if len(paths) != len(labels) or (groups is not None and len(groups) != len(labels)):
            raise CdftError(f"{len(labels)} {split} predictions for {len(paths)} images of the split table")
        predicted = probs.argmax(axis=1).tolist() if len(labels) else []
        for row, (path, label, guess) in enumerate(zip(paths, labels, predicted, strict=True)):
            writer.writerow([split, path, groups[row] if groups is not None else "", label, classes[label], guess,
                             classes[guess], *(repr(float(p)) for p in probs[row])])
    return out.getvalue()


def save_predictions(run: Run, index: int, outputs: Mapping[str, Predictions]) -> None:
    """``predictions.csv`` of stage ``index`` in its directory (rank 0), written atomically."""
    if not run.dist.is_main:
        return
    splits = run.splits
    parts = [(name, getattr(splits, name)["image_path"].tolist(), splits.groups(name), outputs[name])
             for name in SPLITS]
    run.rundir.write_text(f"{stage_dir(run, index)}/{FILE}", predictions_csv(splits.classes, parts))
