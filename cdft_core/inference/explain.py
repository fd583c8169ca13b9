"""``cdft explain``: where in an image the model looks, as Grad-CAM heatmaps (pytorch-grad-cam).

We use the ``grad-cam`` package rather than our own CAM code: its hooks, weighting and
normalisation are widely used and reviewed, and a home-grown variant would be one more
thing to trust. This module only decides *which layer* to explain and *how its output
becomes a 2-D map*, because that depends on the architecture and on the adapter:

- **ConvNeXt**: the last stage's output (B×C×H×W), the usual Grad-CAM layer for a CNN;
  both adapters read that feature map (pooled or as tokens).
- **ViT, pooled head** (``none`` adapter): the last block's first LayerNorm. Its patch
  tokens still feed the class token through the block's attention, whereas after the
  final norm only the class token reaches the head and the patch tokens get no gradient.
- **ViT with a token adapter** (CDTM): the tokens the adapter consumes — the output of the
  backbone's final norm (or last block when it has none); their gradients come straight
  from the adapter.

For ViTs, the token reshape drops the class/register (prefix) tokens and lays the patch
tokens out on the patch grid, channels first, which is what the package's CAM expects.

The CAM target is the classifier's score (logit) for the predicted class, or the class
given with ``--class``. Each map is computed at the model's input size, resized to the
original image and written as an overlay PNG of the image's own size; a grid PNG shows
every overlay with the class explained and its probability.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cdft_core.errors import CdftError, UsageError

INSTALL = "cdft explain needs the explain extra: pip install 'cdft[explain]'"
#: Images per Grad-CAM pass (one forward and one backward pass each).
BATCH = 16
#: At most this many overlays go in grid.png (a figure of thousands would exceed matplotlib's pixel limit).
GRID_MAX = 64


class Explanations(list):
    """The :class:`Explanation` of every image explained, and ``failed``: image → reason it was skipped."""

    def __init__(self, items: Sequence[Explanation] = (), failed: dict[str, str] | None = None, total: int = 0):
        super().__init__(items)
        self.failed: dict[str, str] = dict(failed or {})
        self.total = total


@dataclass
class Explanation:
    """One image's explanation: the class explained, its probability, the top class and the overlay written."""

    image: str
    overlay: str
    explained: str
    probability: float
    predicted: str
    predicted_probability: float
    size: tuple[int, int]  # (height, width) of the image and of its overlay


def require_extra() -> None:
    """Import pytorch-grad-cam now, so a missing extra is one line before any model is loaded."""
    try:
        import pytorch_grad_cam  # noqa: F401
    except ImportError as exc:
        raise CdftError(INSTALL) from exc


def cam_layer(model: nn.Module) -> tuple[nn.Module, Callable[[Tensor], Tensor] | None]:
    """(target layer, reshape transform or None) for a CdftModel's backbone; see the module docstring."""
    backbone = model.backbone
    timm_model = getattr(backbone, "model", None)
    family = getattr(backbone, "family", None)
    if family == "convnext" and hasattr(timm_model, "stages"):
        return timm_model.stages[-1], None
    if family == "vit" and hasattr(timm_model, "blocks"):
        reads_tokens = type(model.adapter).__name__ != "PooledAdapter"
        if reads_tokens:
            norm = getattr(timm_model, "norm", None)
            layer = norm if isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity) else timm_model.blocks[-1]
        else:
            layer = timm_model.blocks[-1].norm1
        grid = getattr(getattr(timm_model, "patch_embed", None), "grid_size", None)
        return layer, token_reshape(int(getattr(backbone, "num_prefix_tokens", 0)), grid)
    raise UsageError(
        f"cdft explain supports ViT and ConvNeXt backbones; {getattr(backbone, 'name', '?')!r} is {family!r}"
    )


def token_reshape(prefix: int, grid: Sequence[int] | None) -> Callable[[Tensor], Tensor]:
    """B×(prefix+N)×C tokens → B×C×H×W: the prefix tokens dropped, the patches on their grid."""

    def reshape(tokens: Tensor) -> Tensor:
        patches = tokens[:, prefix:]
        n = patches.shape[1]
        height, width = (int(grid[0]), int(grid[1])) if grid and int(grid[0]) * int(grid[1]) == n else _square(n)
        return patches.reshape(patches.shape[0], height, width, patches.shape[2]).permute(0, 3, 1, 2)

    return reshape


def _square(n: int) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side != n:
        raise CdftError(f"cannot lay {n} ViT tokens out on a square grid")
    return side, side


def class_index(classes: Sequence[str], name: str | None) -> int | None:
    """The index of ``--class NAME`` (None: each image's predicted class); an unknown name lists the classes."""
    if name is None:
        return None
    if name not in classes:
        raise UsageError(f"--class {name!r} is not one of the model's classes: {', '.join(classes)}")
    return list(classes).index(name)


def explain(target: str, images: Sequence[str], output_dir: str, *, class_name: str | None = None,
            device: str = "auto", grid: bool = True) -> Explanations:
    """Write an overlay PNG per image (and ``grid.png``, the first :data:`GRID_MAX`) to ``output_dir``.

    An unreadable image is skipped and listed in the result's ``failed`` (the others go on).
    """
    from cdft_core.inference.inputs import collect_inputs, read_image
    from cdft_core.inference.model_loading import load_trained

    require_extra()
    check_output_dir(output_dir)
    inputs = collect_inputs(images)
    model, classes, data_config, _ = load_trained(target, device=device)
    wanted = class_index(classes, class_name)
    names = overlay_names([item.path for item in inputs])
    results = Explanations(total=len(inputs))
    for start in range(0, len(inputs), BATCH):
        chunk, pictures, chunk_names = [], [], []
        for item, name in zip(inputs[start : start + BATCH], names[start : start + BATCH], strict=True):
            try:
                pictures.append(read_image(item.path))
            except CdftError as exc:
                results.failed[item.path] = str(exc)
                continue
            chunk.append(item)
            chunk_names.append(name)
        if not chunk:
            continue
        maps, probabilities = grad_cam(model, pictures, data_config, wanted)
        for item, picture, cam, probs, name in zip(chunk, pictures, maps, probabilities, chunk_names, strict=True):
            explained = wanted if wanted is not None else int(np.argmax(probs))
            top = int(np.argmax(probs))
            path = os.path.join(output_dir, name)
            os.makedirs(output_dir, exist_ok=True)  # only once there is something to write
            write_overlay(picture, cam, path)
            results.append(Explanation(item.path, path, classes[explained], float(probs[explained]), classes[top],
                                       float(probs[top]), (int(picture.shape[1]), int(picture.shape[2]))))
    if grid and results:
        write_grid(results[:GRID_MAX], os.path.join(output_dir, "grid.png"))
    return results


def check_output_dir(output_dir: str) -> None:
    """A usage error before any model is loaded when the overlays cannot go to ``output_dir``:
    it is a file, or the nearest folder that exists above it is not writable."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UsageError(f"cannot write the overlays into {output_dir!r}: it is a file; name a folder (-o DIR)")
    from cdft_core.files import unwritable_reason

    reason = unwritable_reason(output_dir)
    if reason:
        raise UsageError(f"cannot write the overlays into {output_dir!r}: {reason}; choose another folder (-o DIR)")


def grad_cam(model: nn.Module, pictures: Sequence[Tensor], data_config: dict[str, Any],
             wanted: int | None) -> tuple[list[np.ndarray], np.ndarray]:
    """(one H×W map in 0..1 per picture, at the picture's size; softmax probabilities B×classes)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from cdft_core.data.transforms import eval_transform

    transform = eval_transform(data_config)
    device = next(model.parameters()).device
    batch = torch.stack([transform(p) for p in pictures]).to(device)
    layer, reshape = cam_layer(model)
    grids: list[tuple[int, ...]] = []
    hook = layer.register_forward_hook(
        lambda _m, _i, out: grids.append(tuple((reshape(out) if reshape else out).shape[-2:])))
    try:
        with torch.no_grad():
            probabilities = torch.softmax(model(batch).float(), dim=1).cpu().numpy()
    finally:
        hook.remove()
    if grids and math.prod(grids[0]) == 1:  # one cell: every heatmap would be one flat colour
        raise UsageError(
            f"Grad-CAM has nothing to show for this model: its backbone's last feature map is 1x1 at its "
            f"{int(batch.shape[-1])} px input; explain a model trained on larger images"
        )
    indices = [wanted if wanted is not None else int(np.argmax(p)) for p in probabilities]
    with torch.enable_grad(), GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        maps = cam(input_tensor=batch, targets=[ClassifierOutputTarget(i) for i in indices])
    resized = [_resize(m, (int(p.shape[1]), int(p.shape[2]))) for m, p in zip(maps, pictures, strict=True)]
    return resized, probabilities


def _resize(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A map stretched to (height, width), bilinear, kept in 0..1."""
    tensor = torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32))[None, None]
    out = torch.nn.functional.interpolate(tensor, size=size, mode="bilinear", align_corners=False)
    return out[0, 0].clamp_(0, 1).numpy()


def write_overlay(picture: Tensor, cam: np.ndarray, path: str) -> None:
    """The heatmap blended over the image (pytorch-grad-cam's ``show_cam_on_image``), as a PNG of the image's size."""
    from PIL import Image
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = picture.permute(1, 2, 0).numpy().astype(np.float32) / 255.0
    overlay = show_cam_on_image(rgb, cam, use_rgb=True)
    Image.fromarray(overlay).save(path, format="PNG")


def write_grid(results: Sequence[Explanation], path: str) -> None:
    """Every overlay in one figure, titled with the image, the class explained and its probability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    columns = min(4, len(results))
    rows = math.ceil(len(results) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.3 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, result in zip(axes.flat, results, strict=False):
        with Image.open(result.overlay) as image:
            axis.imshow(np.asarray(image))
        title = f"{os.path.basename(result.image)}\n{result.explained} p={result.probability:.2f}"
        if result.predicted != result.explained:
            title += f" (top: {result.predicted} {result.predicted_probability:.2f})"
        axis.set_title(title, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def overlay_names(paths: Sequence[str]) -> list[str]:
    """``<image stem>.cam.png`` per image, numbered when two images share a stem (from different folders)."""
    names: list[str] = []
    used: set[str] = {"grid.png"}
    for path in paths:
        stem = os.path.splitext(os.path.basename(path.rstrip("/")))[0] or "image"
        name, k = f"{stem}.cam.png", 2
        while name in used:
            name, k = f"{stem}-{k}.cam.png", k + 1
        used.add(name)
        names.append(name)
    return names
