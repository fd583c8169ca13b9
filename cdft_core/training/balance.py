"""Class imbalance: loss weights from the training counts (``--class-weights balanced``) and a
class-balanced draw of each epoch's images (``--sampler balanced``).

Both are functions of the training split's labels (and, for the draw, of the seed and the
epoch) only, so every rank computes the same weights and the same draw, and a resumed run
recomputes exactly what the interrupted one used: nothing of them is saved but the options.

A class with no training image gets the weight 0 and a logged warning rather than a refusal:
no training target is of that class, so its weight never multiplies a loss term — refusing
would only stop a run whose validation or test folds hold a class that training cannot learn,
which the run already warns about for those splits. The other classes' weights are
scikit-learn's ``compute_class_weight("balanced")`` over the classes present (K counts them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from cdft_core.training.schedule import derive_seed

#: the values of ``--class-weights`` and ``--sampler`` that change nothing
UNWEIGHTED, SHUFFLED = "none", "random"


def class_counts(labels: Sequence[int], num_classes: int) -> list[int]:
    """Images per class (index == label), zeros included."""
    counts = [0] * num_classes
    for label in labels:
        counts[int(label)] += 1
    return counts


def balanced_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """``w_c = N / (K · n_c)`` (float32, one per class): N training images, K classes that have
    any, n_c images of class c; 0 for a class without training images (see the module docstring).
    Every class then contributes the same total weight to an epoch's loss."""
    counts = class_counts(labels, num_classes)
    present = sum(1 for n in counts if n)
    total = sum(counts)
    return torch.tensor([total / (present * n) if n else 0.0 for n in counts], dtype=torch.float32)


def loss_weights(option: str, labels: Sequence[int], classes: Sequence[str],
                 log: Callable[[str], None] | None = None, *, sampler: str = "random") -> torch.Tensor | None:
    """The training loss's class weights ``--class-weights`` asks for (None: unweighted), logged."""
    if option == UNWEIGHTED:
        return None
    if sampler == "balanced" and log is not None:
        log("warning: --class-weights balanced with --sampler balanced corrects the class imbalance twice "
            "(the sampler already draws every class equally often): rare classes now outweigh common ones")
    weights = balanced_weights(labels, len(classes))
    counts = class_counts(labels, len(classes))
    if log is not None:
        absent = [name for name, n in zip(classes, counts, strict=True) if not n]
        log("class weights (balanced, training loss only): "
            + ", ".join(f"{name} {float(w):.4g}" for name, w in zip(classes, weights, strict=True)))
        if absent:
            log(f"warning: the training split has no image of {', '.join(absent)}; weight 0, the model cannot "
                f"learn {'it' if len(absent) == 1 else 'them'}")
    if all(float(w) == 1.0 for w, n in zip(weights, counts, strict=True) if n):
        return None  # a balanced training split: the unweighted loss, bit for bit
    return weights


def balanced_draw(labels: Sequence[int], *, seed: int, epoch: int) -> list[int]:
    """An epoch's ``len(labels)`` image indices drawn with replacement, each image with
    probability ∝ 1/n_class(image), so every class present is drawn equally often on average.

    The generator is seeded by (seed, epoch) only: every rank draws the same list and takes its
    share of it (:func:`cdft_core.training.loaders.shard`), as ``DistributedSampler`` shares a
    shuffle.
    """
    if not len(labels):
        return []
    counts = class_counts(labels, max(int(v) for v in labels) + 1)
    probabilities = torch.tensor([1.0 / counts[int(v)] for v in labels], dtype=torch.float64)
    generator = torch.Generator().manual_seed(derive_seed(seed, "balanced-sampler", epoch))
    return torch.multinomial(probabilities, len(labels), replacement=True, generator=generator).tolist()
