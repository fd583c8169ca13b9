"""Train-path images/s per core: the paper's float pipeline, cdft decoding each time, cdft
from the image cache.

Writes PNGs with a tissue-like texture (stained background, nuclei-like blobs, fine
noise; they compress about as real H&E PNGs do, not like flat colour) at 700×460
(BreakHis) and 2048×2048, then times one pass of the train path over them, on one
thread, for three pipelines:

- ``reference``: as the paper's code does it: Pillow decode, convert to ``float32``,
  then resize and augment on floats (the same resize, flips, ±10 % brightness and
  contrast, shift-scale-rotate and normalisation as cdft, on float tensors).
- ``uncached``: cdft without the cache (``--no-cache``): ``ImageDataset`` over the PNGs
  with ``train_transform`` (decode, ``uint8`` resize, augmentation), seeded per image
  as training does (``SeededAugmentation``).
- ``cached``: the same dataset reading the resized ``uint8`` images from the cache; the
  time to build the cache (one thread per CPU: key, decode, resize, write, digest) is
  reported apart, as ``build_s`` and ``build_img_s``.

``identical`` checks that the cached and uncached tensors are equal, bit for bit.
``--augment paper+hed`` (or ``none``) times cdft's pipelines with that ``--augment``
choice instead of the paper's (the reference stays the paper's).
A pass sends every image through one pipeline; the three pipelines' passes alternate,
``--repeats`` times, and each pipeline's time is its median pass (a short busy moment on
a shared machine does not count, a long one slows all three alike).

    python benchmarks/pipeline.py            # a table
    python benchmarks/pipeline.py --json     # a JSON list, one object per image size
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

#: (width, height) of the generated images -> how many
SIZES = {"700x460": ((700, 460), 24), "2048x2048": ((2048, 2048), 6)}


def tissue_png(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A PNG with H&E-like texture: smooth stain variation, dark blobs, fibres and noise."""
    from PIL import Image

    def smooth(scale: float) -> np.ndarray:
        noise = rng.normal(size=(height, width))
        fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
        field = np.fft.irfft2(np.fft.rfft2(noise) * np.exp(-(fy**2 + fx**2) * scale**2), s=(height, width))
        return (field - field.mean()) / field.std()

    stain, blobs, fibres = smooth(120.0), smooth(18.0), smooth(4.0)
    pink = np.array([232.0, 160.0, 205.0]) * (1 - 0.12 * np.tanh(stain))[..., None]
    nuclei = np.clip(blobs - 1.2, 0, None)[..., None] * np.array([-110.0, -95.0, -40.0])
    pixels = pink + nuclei + 10 * fibres[..., None] + rng.normal(0, 5, size=(height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def reference_transform(data_config: dict) -> Callable[[str], torch.Tensor]:
    """The paper's way: Pillow decode -> float32 -> resize and augment on floats."""
    from PIL import Image
    from torchvision.transforms import v2

    from cdft_core.data.transforms import interpolation_mode

    steps = v2.Compose([
        v2.Resize(data_config["input_size"][1:], interpolation=interpolation_mode(data_config["interpolation"]),
                  antialias=True),
        v2.RandomHorizontalFlip(0.5), v2.RandomVerticalFlip(0.5),
        v2.RandomApply([v2.ColorJitter(brightness=0.1, contrast=0.1)], p=0.5),
        v2.RandomApply([v2.RandomAffine(180, (0.05, 0.05), (0.7, 1.3), interpolation=v2.InterpolationMode.BILINEAR,
                                        fill=0)], p=0.7),
        v2.Normalize(data_config["mean"], data_config["std"]),
    ])

    def load(path: str) -> torch.Tensor:
        with Image.open(path) as image:
            floats = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return steps(torch.from_numpy(floats).permute(2, 0, 1))

    return load


def measure(name: str, size: tuple[int, int], count: int, folder: str, input_size: int, repeats: int,
            augment: str = "paper") -> dict:
    import pandas as pd

    from cdft_core.data.image_cache import cache_for_tables
    from cdft_core.data.images import ImageDataset
    from cdft_core.data.transforms import train_transform
    from cdft_core.training.loaders import SeededAugmentation

    rng = np.random.default_rng(0)
    root = os.path.join(folder, name)
    os.makedirs(root)
    paths = [f"tile_{i:03d}.png" for i in range(count)]
    png_bytes = 0
    for path in paths:
        data = tissue_png(rng, *size)
        png_bytes += len(data)
        with open(os.path.join(root, path), "wb") as handle:
            handle.write(data)
    table = pd.DataFrame({"image_path": paths, "label": [0] * count})
    data_config = {"input_size": (3, input_size, input_size), "interpolation": "bicubic",
                   "mean": (0.481, 0.458, 0.408), "std": (0.269, 0.261, 0.276)}  # CLIP's

    import tqdm  # noqa: F401 - imported before the build is timed, as the other imports are

    train_transform(data_config, augment)(torch.zeros(3, 8, 8, dtype=torch.uint8))
    start = time.perf_counter()
    cache = cache_for_tables(root, [table], data_config, cache_dir=os.path.join(folder, "cache"))
    build_s = time.perf_counter() - start

    reference = reference_transform(data_config)
    uncached = SeededAugmentation(ImageDataset(root, table, train_transform(data_config, augment)), seed=1)
    cached = SeededAugmentation(ImageDataset(root, table, train_transform(data_config, augment), cache), seed=1)
    identical = all(torch.equal(uncached[i][0], cached[i][0]) for i in range(count))

    def reference_item(i: int) -> torch.Tensor:  # the paper draws from one stream, unseeded per image
        return reference(os.path.join(root, paths[i]))

    torch.manual_seed(0)
    pipelines = {"reference": reference_item, "uncached": uncached.__getitem__, "cached": cached.__getitem__}
    passes: dict[str, list[float]] = {key: [] for key in pipelines}
    for items in pipelines.values():  # warm-up
        items(0)
    for _ in range(repeats):  # interleaved passes: a long busy spell slows every pipeline alike
        for key, items in pipelines.items():
            start = time.perf_counter()
            for i in range(count):
                items(i)
            passes[key].append(time.perf_counter() - start)
    rates = {key: count / statistics.median(times) for key, times in passes.items()}
    return {
        "image_size": name, "images": count, "input_size": input_size, "augment": augment,
        "png_kb_mean": round(png_bytes / count / 1024),
        **{f"{key}_img_s": round(rate, 1) for key, rate in rates.items()},
        "cached_vs_uncached": round(rates["cached"] / rates["uncached"], 1),
        "cached_vs_reference": round(rates["cached"] / rates["reference"], 1),
        "uncached_vs_reference": round(rates["uncached"] / rates["reference"], 2),
        "build_s": round(build_s, 2), "build_img_s": round(count / build_s, 1),
        "cache_mb": round(cache.nbytes / 2**20, 1), "identical": identical,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per image size")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per pipeline (median used)")
    parser.add_argument("--input-size", type=int, default=224, help="the model's input size (default 224)")
    parser.add_argument("--size", choices=sorted(SIZES), action="append", help="only these image sizes")
    parser.add_argument("--augment", default="paper", help="cdft's --augment choice: paper, paper+hed or none")
    parser.add_argument("--images", type=int, help="images per size (default 24 at 700x460, 6 at 2048x2048)")
    parser.add_argument("--device", default="cpu", help="accepted for gpu_smoke.sh and ignored: the data pipeline "
                        "runs on the CPU (in the loader workers) whatever device trains")
    args = parser.parse_args(argv)
    for option in ("repeats", "input_size", "images"):
        value = getattr(args, option)
        if value is not None and value < 1:  # 0 must not mean "the default" nor a median of no passes
            parser.error(f"--{option.replace('_', '-')} {value}: must be at least 1")
    from cdft_core.data.transforms import check_augment
    from cdft_core.errors import UsageError

    try:  # before any image is written: an unknown choice costs a second, not a run
        check_augment(args.augment)
    except UsageError as exc:
        parser.error(str(exc))
    torch.set_num_threads(1)  # images/s per core
    results = []
    with tempfile.TemporaryDirectory(prefix="cdft-pipeline-") as folder:
        for name in args.size or list(SIZES):
            size, count = SIZES[name]
            results.append(measure(name, size, count if args.images is None else args.images, folder, args.input_size, args.repeats,
                                   args.augment))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"train path, images/s on one core, input {args.input_size}px, --augment {args.augment} — "
          f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, median of {args.repeats}")
    print(f"{'images':<10} {'PNG KB':>7} {'reference':>10} {'uncached':>9} {'cached':>8} {'cached/uncached':>16} "
          f"{'cached/reference':>17} {'build img/s':>12} {'identical':>9}")
    for row in results:
        print(f"{row['image_size']:<10} {row['png_kb_mean']:>7} {row['reference_img_s']:>10} "
              f"{row['uncached_img_s']:>9} {row['cached_img_s']:>8} {row['cached_vs_uncached']:>16} "
              f"{row['cached_vs_reference']:>17} {row['build_img_s']:>12} {str(row['identical']):>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
