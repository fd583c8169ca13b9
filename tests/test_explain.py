"""``cdft explain`` on tiny trained runs (ViT with CDTM, ConvNeXt with a pooled head): one
overlay PNG per image at the image's own size, a grid PNG, ``--class``, and the layer
each architecture is explained at."""

from __future__ import annotations

import json
import tempfile

import numpy as np
import pytest
import torch
from helpers_engine import engine_data, invoke, quick_args, staged_run
from PIL import Image

pytest.importorskip("pytorch_grad_cam", reason="needs the explain extra: pip install 'cdft[explain]'")

SIZES = [(40, 50), (61, 33)]  # (height, width), neither square nor the model's input size


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return staged_run(tmp_path_factory)


@pytest.fixture(scope="module")
def convnext_run(tmp_path_factory):
    root, split = engine_data(tmp_path_factory)
    out = tmp_path_factory.mktemp("convnext") / "run"
    args = quick_args(root, split, strategy="linear", backbone="test_convnext", epochs=1,
                      extra=("--image-size", "64", "--output", str(out)))
    code, _, err = invoke(*args)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(SIZES):
        path = folder / f"tile{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _explain_and_check(run_dir, images, out, *extra):
    code, stdout, stderr = invoke("explain", str(run_dir), *map(str, images), "-o", str(out), "--json", *extra)
    assert code == 0, stderr
    records = json.loads(stdout)
    assert [r["image"] for r in records] == [str(p) for p in images]
    for record, path, (h, w) in zip(records, images, SIZES, strict=True):
        with Image.open(record["overlay"]) as overlay, Image.open(path) as original:
            assert overlay.size == (w, h) and overlay.mode == "RGB"
            assert not np.array_equal(np.asarray(overlay), np.asarray(original))  # the heatmap is drawn
        assert 0.0 <= record["probability"] <= 1.0
    with Image.open(out / "grid.png") as grid:
        assert grid.size[0] > 100 and grid.size[1] > 100
    return records


def test_a_cdtm_vit_run_gets_an_overlay_per_image_at_its_size_and_a_grid(run, images, tmp_path):
    records = _explain_and_check(run, images, tmp_path / "cams")
    assert all(r["class"] == r["predicted"] for r in records)
    assert sorted(p.name for p in (tmp_path / "cams").iterdir()) == ["grid.png", "tile0.cam.png", "tile1.cam.png"]


def test_class_picks_the_class_explained(run, images, tmp_path):
    from cdft_core.inference.model_loading import load_trained

    classes = load_trained(str(run), device="cpu")[1]
    records = _explain_and_check(run, images, tmp_path / "cams", "--class", classes[-1])
    assert {r["class"] for r in records} == {classes[-1]}
    code, _, stderr = invoke("explain", str(run), str(images[0]), "-o", str(tmp_path / "x"), "--class", "nope")
    assert code == 2 and classes[0] in stderr


def test_a_convnext_run_is_explained_at_its_last_stage(convnext_run, images, tmp_path):
    _explain_and_check(convnext_run, images, tmp_path / "cams")


def test_the_layer_explained_follows_the_architecture_and_the_adapter():
    import torch

    from cdft_core.inference.explain import cam_layer, grad_cam
    from cdft_core.models.model import build_model

    vit_cdtm = build_model("test_vit", "cdtm", 3, pretrained=False, image_size=32)
    vit_pooled = build_model("test_vit", "none", 3, pretrained=False, image_size=32)
    convnext = build_model("test_convnext", "cdtm", 3, pretrained=False, image_size=64)
    assert cam_layer(vit_cdtm)[0] is vit_cdtm.backbone.model.norm  # the tokens CDTM reads
    assert cam_layer(vit_pooled)[0] is vit_pooled.backbone.model.blocks[-1].norm1
    assert cam_layer(convnext) == (convnext.backbone.model.stages[-1], None)

    layer, reshape = cam_layer(vit_cdtm)
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # 1 class token + 2×2 patches
    grid = reshape(tokens)
    assert grid.shape == (2, 3, 2, 2)
    assert torch.equal(grid[:, :, 0, 1], tokens[:, 2])  # the class token dropped, patches row by row

    picture = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    maps, probs = grad_cam(vit_pooled.eval(), [picture], vit_pooled.data_config, None)
    assert maps[0].shape == (20, 30) and np.isfinite(maps[0]).all()
    assert probs.shape == (1, 3) and probs.sum() == pytest.approx(1.0, abs=1e-5)


def test_an_unreadable_image_is_skipped_and_listed(run, images, tmp_path, monkeypatch):
    import cdft_core.inference.explain as explain_module

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    monkeypatch.setattr(explain_module, "GRID_MAX", 1)
    out = tmp_path / "cams"
    code, stdout, stderr = invoke("explain", str(run), str(broken), *map(str, images), "-o", str(out))
    assert code == 0, stderr
    assert f"cannot read {broken}" in stderr
    assert stderr.strip().splitlines()[-1] == f"{len(images) + 1} images, 1 could not be read (listed in the lines above)"
    assert f"(the first 1 of {len(images)} images)" in stdout
    assert (out / "grid.png").exists() and not (out / "broken.cam.png").exists()
    code, _, stderr = invoke("explain", str(run), str(broken), "-o", str(tmp_path / "none"))
    assert code == 1
    assert stderr.strip().splitlines()[-1] == "1 images, 1 could not be read (listed in the lines above; nothing written)"
    assert not (tmp_path / "none").exists()  # nothing written: not even an empty folder


def test_an_output_that_cannot_hold_overlays_is_refused_before_the_model_loads(run, images, tmp_path, monkeypatch):
    import cdft_core.inference.model_loading as loading

    monkeypatch.setattr(loading, "load_trained", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _, stderr = invoke("explain", str(run), str(images[0]), "-o", str(images[0]))
    assert code == 2 and stderr.strip() == (f"cdft: error: cannot write the overlays into {str(images[0])!r}: "
                                            f"it is a file; name a folder (-o DIR)")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # as in a folder without write access (root ignores chmod)
        if dir == str(locked):
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    code, _, stderr = invoke("explain", str(run), str(images[0]), "-o", str(locked / "a" / "b"))
    assert code == 2 and stderr.strip() == (f"cdft: error: cannot write the overlays into {str(locked / 'a' / 'b')!r}: "
                                            f"{str(locked)!r} does not allow writing (Permission denied); "
                                            f"choose another folder (-o DIR)")
    assert list(locked.iterdir()) == []


def test_a_one_cell_feature_map_is_refused_not_drawn_flat():
    """test_convnext at 32 px ends in a 1x1 map: every overlay would be one flat colour."""
    from cdft_core.errors import UsageError
    from cdft_core.inference.explain import grad_cam
    from cdft_core.models.model import build_model

    picture = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    small = build_model("test_convnext", "none", 3, pretrained=False, image_size=32).eval()
    with pytest.raises(UsageError, match=r"last feature map is 1x1 at its 32 px input; explain a model trained on larger"):
        grad_cam(small, [picture], small.data_config, None)
    larger = build_model("test_convnext", "none", 3, pretrained=False, image_size=64).eval()
    maps, _ = grad_cam(larger, [picture], larger.data_config, None)
    assert maps[0].shape == (40, 50)
