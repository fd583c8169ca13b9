"""The paper's train-time augmentation and the evaluation resize, on ``uint8`` tensors.

Everything about preprocessing comes from the backbone's data config (image size,
interpolation, mean, std); nothing is hard-coded, because the reference normalised every
backbone with CLIP's statistics, which is wrong for ImageNet-21k weights (docs/method.md#recipe).

The train pipeline restates docs/method.md#recipe with torchvision.transforms.v2:

=======================================  ==============================================
paper (albumentations)                   here
=======================================  ==============================================
resize to the input size                 ``Resize((H, W), interpolation)``
horizontal flip, p=0.5                   ``RandomHorizontalFlip(0.5)``
vertical flip, p=0.5                     ``RandomVerticalFlip(0.5)``
brightness and contrast ±10 %, p=0.5     ``RandomApply([ColorJitter(0.1, 0.1)], p=0.5)``
shift ±5 %, scale ±30 %, rotate ±180°,   ``RandomApply([RandomAffine(180, (0.05, 0.05),
black border, p=0.7                      (0.7, 1.3), fill=0)], p=0.7)``
=======================================  ==============================================

then ``ToDtype(float32, scale=True)`` and ``Normalize(mean, std)``. Every random draw
comes from torch's global generator, so seeding torch (as the engine does, per worker
too) makes the augmentation reproducible.

``--augment`` chooses among three pipelines (:data:`AUGMENTS`): ``paper`` (the default,
above), ``none`` (resize and normalise only: what evaluation does) and ``paper+hed``: the
paper's with HED stain jitter (:class:`cdft_core.data.stain.HedJitter`) right after the
resize. There because it models how the slide took up its stains: it must see the colours
as scanned (deconvolution assumes light absorbed from a white background), before the
brightness and contrast jitter changes them and before the affine blends tissue with its
black border, which is not tissue; flips move pixels without changing them (either order
gives the same image); and after the resize it works on the model's input size, not the
stored image's. The resize stays first, so the image cache serves every choice.

Both pipelines begin with the same deterministic resize, which draws no random number.
:func:`split_resize` separates it from the rest, so the image cache
(:mod:`cdft_core.data.image_cache`) can store its ``uint8`` output once and apply only
the rest each time: the images, and the RNG stream, are those of the whole pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from cdft_core.config import AUGMENTS
from cdft_core.errors import UsageError

#: Interpolations torchvision can apply to tensors, and what the others fall back to.
_TENSOR_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic")
_FALLBACK = {"lanczos": "bicubic", "hamming": "bicubic", "box": "bilinear", "random": "bilinear"}


def interpolation_mode(name: str | None) -> Any:
    """torchvision's ``InterpolationMode`` for a data config's interpolation name.

    Tensors support nearest, bilinear and bicubic; ``lanczos``/``hamming`` (Pillow-only)
    fall back to bicubic, ``box`` and timm's ``random`` to bilinear.
    """
    from torchvision.transforms import InterpolationMode

    key = str(name or "bilinear").lower()
    key = _FALLBACK.get(key, key)
    if key not in _TENSOR_MODES:
        raise UsageError(
            f"unknown interpolation {name!r} in the data config; use one of: {', '.join(_TENSOR_MODES + tuple(_FALLBACK))}"
        )
    return InterpolationMode(key)


@dataclass(frozen=True)
class ResizeSpec:
    """The deterministic first step of both pipelines: resize to ``height×width``.

    ``interpolation`` is the tensor mode actually used (after the fallbacks of
    :func:`interpolation_mode`), so configs that resize identically compare equal.
    """

    height: int
    width: int
    interpolation: str
    antialias: bool = True

    @classmethod
    def from_data_config(cls, data_config: Mapping[str, Any]) -> ResizeSpec:
        height, width = _size(data_config)
        return cls(height, width, interpolation_mode(data_config.get("interpolation")).value, True)

    def transform(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The ``v2.Resize`` itself: ``uint8 3×h×w`` in, ``uint8 3×H×W`` out."""
        from torchvision.transforms import v2

        return v2.Resize((self.height, self.width), interpolation=interpolation_mode(self.interpolation),
                         antialias=self.antialias)


def resize_transform(data_config: Mapping[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The resize both pipelines begin with."""
    return ResizeSpec.from_data_config(data_config).transform()


def split_resize(transform: Any) -> tuple[ResizeSpec, Callable[[torch.Tensor], torch.Tensor]]:
    """(the leading resize, the steps after it) of a pipeline built here.

    Raises :class:`UsageError` for a transform that does not begin with a fixed-size
    ``v2.Resize``: its images cannot come from the image cache.
    """
    from torchvision.transforms import v2

    steps = list(transform.transforms) if isinstance(transform, v2.Compose) else []
    first = steps[0] if steps else None
    if not isinstance(first, v2.Resize) or len(first.size or ()) != 2 or first.max_size is not None:
        raise UsageError(f"the image cache needs a v2.Compose that begins with a fixed-size v2.Resize, not "
                         f"{type(transform).__name__}; pass --no-cache, or build it with train_transform/eval_transform")
    height, width = (int(v) for v in first.size)
    spec = ResizeSpec(height, width, first.interpolation.value, bool(first.antialias))
    return spec, v2.Compose(steps[1:])


def _size(data_config: Mapping[str, Any]) -> tuple[int, int]:
    size = data_config.get("input_size")
    if size is None or len(size) not in (2, 3):
        raise UsageError(f"the data config needs input_size (3, H, W), got {size!r}")
    height, width = (int(v) for v in tuple(size)[-2:])
    return height, width


def _normalise(data_config: Mapping[str, Any]) -> list[Callable[[Any], Any]]:
    from torchvision.transforms import v2

    mean, std = data_config.get("mean"), data_config.get("std")
    if mean is None or std is None or len(mean) != 3 or len(std) != 3:
        raise UsageError(f"the data config needs 3-channel mean and std, got mean={mean!r} std={std!r}")
    return [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=[float(m) for m in mean], std=[float(s) for s in std]),
    ]


def train_transform(data_config: Mapping[str, Any], augment: str = "paper") -> Callable[[torch.Tensor], torch.Tensor]:
    """The training pipeline ``augment`` names: ``uint8 3×h×w`` in, normalised ``float32 3×H×W`` out.

    ``paper``: the paper's augmentation; ``paper+hed``: the same with HED stain jitter
    after the resize (it needs scikit-image); ``none``: :func:`eval_transform`.
    """
    from torchvision.transforms import v2

    check_augment(augment)
    if augment == "none":
        return eval_transform(data_config)
    stain = []
    if augment == "paper+hed":
        from cdft_core.data.stain import HedJitter

        stain = [HedJitter()]
    return v2.Compose(
        [
            resize_transform(data_config),
            *stain,
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomVerticalFlip(p=0.5),
            v2.RandomApply([v2.ColorJitter(brightness=0.1, contrast=0.1)], p=0.5),
            v2.RandomApply(
                [
                    v2.RandomAffine(
                        degrees=180,
                        translate=(0.05, 0.05),
                        scale=(0.7, 1.3),
                        interpolation=v2.InterpolationMode.BILINEAR,
                        fill=0,
                    )
                ],
                p=0.7,
            ),
            *_normalise(data_config),
        ]
    )


def check_augment(augment: str) -> None:
    """A one-line :class:`UsageError` for an unknown choice, or for ``paper+hed`` without scikit-image.

    Runs call it before any work (:func:`cdft_core.training.preflight.preflight`), so a
    missing package costs a second, not a failing loader worker.
    """
    from cdft_core.config import check_choice

    check_choice("augment", augment, AUGMENTS)
    if augment == "paper+hed":
        from cdft_core.data.stain import require_skimage

        require_skimage()


def eval_transform(data_config: Mapping[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Resize only, then the same scaling and normalisation as training."""
    from torchvision.transforms import v2

    return v2.Compose([resize_transform(data_config), *_normalise(data_config)])
