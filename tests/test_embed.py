"""``cdft embed``: one feature row per readable image, paths in the file, from a run or a backbone."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers_engine import engine_data, invoke, staged_run


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root, _ = engine_data(tmp_path_factory)
    return sorted(Path(root).rglob("*.png"))[:5]


def test_embed_a_run_writes_one_row_per_image(tmp_path_factory, images, tmp_path):
    from cdft_core.inference.embed import read_embeddings

    run = staged_run(tmp_path_factory)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"junk")
    out = tmp_path / "f.safetensors"
    code, stdout, err = invoke("embed", str(run), *map(str, images), str(bad), "-o", str(out),
                               "--num-workers", "0", "--device", "cpu")
    assert code == 0, err
    assert stdout.strip().splitlines()[-1] == f"{len(images) + 1} images, 1 could not be read (listed in {out})"
    paths, features, meta = read_embeddings(str(out))
    assert paths == [str(p) for p in images]
    assert features.shape[0] == len(images) and features.ndim == 2
    assert list(meta["errors"]) == [str(bad)] and meta["feature"] == "adapter"


def test_embed_a_bare_backbone(images, tmp_path):
    from cdft_core.inference.embed import read_embeddings

    out = tmp_path / "b.safetensors"
    code, _, err = invoke("embed", "--backbone", "test_vit", "--no-pretrained", "--image-size", "32",
                          str(images[0].parent), "-o", str(out), "--num-workers", "0", "--device", "cpu")
    assert code == 0, err
    paths, features, meta = read_embeddings(str(out))
    assert len(paths) == features.shape[0] == len(list(images[0].parent.rglob("*.png")))
    assert meta["feature"] == "pooled" and meta["source"] == "test_vit"
