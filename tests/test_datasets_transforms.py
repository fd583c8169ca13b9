"""Transforms from the data config, the torch Dataset, and the synthetic data's learnability."""

from __future__ import annotations

import pytest
import torch
from helpers_data import DATA_CONFIG, breakhis_root
from torchvision.transforms import v2

from cdft_core.data.images import ImageDataset, decode_image
from cdft_core.data.transforms import eval_transform, interpolation_mode, train_transform
from cdft_core.errors import UsageError


def constant(value: int, height: int = 40, width: int = 60) -> torch.Tensor:
    return torch.full((3, height, width), value, dtype=torch.uint8)


def test_eval_transform_resizes_and_normalises_with_the_config():
    config = {**DATA_CONFIG, "input_size": (3, 24, 40)}
    out = eval_transform(config)(constant(200))
    assert out.dtype == torch.float32 and out.shape == (3, 24, 40)
    for c in range(3):
        expected = (200 / 255 - config["mean"][c]) / config["std"][c]
        assert torch.allclose(out[c], torch.full_like(out[c], expected), atol=1e-5)
    other = eval_transform({**config, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})(constant(200))
    assert not torch.allclose(out, other)  # mean/std come from the config, not from a constant


def test_train_transform_is_the_paper_recipe():
    steps = train_transform(DATA_CONFIG).transforms
    resize, hflip, vflip, jitter, affine, to_float, normalise = steps
    assert isinstance(resize, v2.Resize) and tuple(resize.size) == (32, 32)
    assert resize.interpolation == v2.InterpolationMode.BICUBIC
    assert isinstance(hflip, v2.RandomHorizontalFlip) and hflip.p == 0.5
    assert isinstance(vflip, v2.RandomVerticalFlip) and vflip.p == 0.5
    assert jitter.p == 0.5
    (colour,) = jitter.transforms
    assert colour.brightness == (0.9, 1.1) and colour.contrast == (0.9, 1.1) and colour.hue is None
    assert affine.p == 0.7
    (shift_scale_rotate,) = affine.transforms
    assert shift_scale_rotate.degrees == [-180.0, 180.0]
    assert tuple(shift_scale_rotate.translate) == (0.05, 0.05) and tuple(shift_scale_rotate.scale) == (0.7, 1.3)
    assert shift_scale_rotate.fill == 0  # black border
    assert isinstance(to_float, v2.ToDtype) and isinstance(normalise, v2.Normalize)
    assert tuple(normalise.mean) == DATA_CONFIG["mean"] and tuple(normalise.std) == DATA_CONFIG["std"]


def test_train_transform_draws_from_torch_rng():
    image = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    transform = train_transform(DATA_CONFIG)
    torch.manual_seed(5)
    first = [transform(image) for _ in range(4)]
    torch.manual_seed(5)
    again = [transform(image) for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(first[0], other) for other in first[1:])  # it does augment
    assert first[0].shape == (3, 32, 32) and first[0].dtype == torch.float32


def test_interpolation_names():
    assert interpolation_mode("bilinear") == v2.InterpolationMode.BILINEAR
    assert interpolation_mode("lanczos") == v2.InterpolationMode.BICUBIC  # Pillow-only mode: closest tensor one
    with pytest.raises(UsageError, match="unknown interpolation 'cubic'"):
        interpolation_mode("cubic")
    with pytest.raises(UsageError, match="input_size"):
        eval_transform({"mean": (0, 0, 0), "std": (1, 1, 1)})
    with pytest.raises(UsageError, match="3-channel mean and std"):
        train_transform({"input_size": (3, 8, 8), "mean": (0.5,), "std": (0.5,)})


def test_decode_image_gives_rgb_uint8_from_grey_and_rgba():
    import io

    from PIL import Image

    for mode, size in (("L", (7, 5)), ("RGBA", (7, 5)), ("RGB", (7, 5))):
        buffer = io.BytesIO()
        Image.new(mode, size).save(buffer, format="PNG")
        image = decode_image(buffer.getvalue(), f"{mode}.png")
        assert image.dtype == torch.uint8 and image.shape == (3, 5, 7)


def test_synthetic_classes_are_learnable_at_32px(tmp_path_factory):
    """Nearest class mean of augmented 32 px images, on patients never seen: near perfect."""
    from cdft_core.data.splits import load_splits

    splits = load_splits("breakhis", breakhis_root(tmp_path_factory), split_file=None, val_fold=0, test_fold=1)
    torch.manual_seed(0)
    train = ImageDataset(splits.root, splits.train, train_transform(DATA_CONFIG))
    test = ImageDataset(splits.root, splits.test, eval_transform(DATA_CONFIG))

    def features(image: torch.Tensor) -> torch.Tensor:
        return torch.cat([image.mean(dim=(1, 2)), image.std(dim=(1, 2))])

    sums = torch.zeros(4, 6)
    counts = torch.zeros(4)
    for i in range(len(train)):
        image, label = train[i]
        sums[label] += features(image)
        counts[label] += 1
    centres = sums / counts[:, None]
    correct = sum(
        int(torch.cdist(features(test[i][0])[None], centres).argmin()) == test[i][1] for i in range(len(test))
    )
    assert len(set(splits.test["label"])) >= 3  # the test fold really has several classes
    assert correct / len(test) >= 0.9
