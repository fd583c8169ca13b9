"""The frozen-feature cache: the same validation and test metrics with and without it (bit for
bit on CPU; each rank's share stored in its evaluation loader's batches), the train views of
`--train-views`, a new cache for changed weights, and the store itself (dtypes, corruption,
disk space, `cdft cache list/clear`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from helpers_engine import engine_data, invoke, metric_lines, quick_args, read_json
from safetensors.torch import save_file

from cdft_core.config import RunConfig, dump_yaml, merge, resolve_config
from cdft_core.data.cache_dir import list_caches
from cdft_core.errors import CdftError, UsageError
from cdft_core.models.model import Features
from cdft_core.training.feature_store import open_store


def _run(tmp_path: Path, root: str, split: str, name: str, *extra: str, strategy: str = "linear",
         epochs: int = 2) -> tuple[Path, str]:
    out = tmp_path / name
    args = quick_args(root, split, strategy=strategy, epochs=epochs)
    if "--weights" in extra:
        args.remove("--no-pretrained")
    code, _, err = invoke(*args, "--output", str(out), *extra)
    assert code == 0, err
    return out, err


def _split_lines(run_dir: Path, *splits: str) -> list[dict]:
    return [line for line in metric_lines(run_dir) if line["split"] in splits]


# -- whole runs -------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["linear", "frt"])
def test_validation_and_test_metrics_are_identical_with_and_without_the_cache(tmp_path_factory, tmp_path, strategy):
    root, split = engine_data(tmp_path_factory)
    plain, plain_err = _run(tmp_path, root, split, "plain", "--no-feature-cache", strategy=strategy)
    cached, cached_err = _run(tmp_path, root, split, "cached", strategy=strategy)
    again, again_err = _run(tmp_path, root, split, "again", strategy=strategy)
    assert "feature cache" not in plain_err
    assert len(re.findall(r"feature cache built", cached_err)) == 2  # val and test, once per stage
    assert len(re.findall(r"feature cache reused", again_err)) == 2
    reference = _split_lines(plain, "val", "test")
    assert {line["split"] for line in reference} == {"val", "test"} and len(reference) == 3
    for run_dir in (cached, again):  # every number, bit for bit (JSON floats round-trip exactly)
        assert _split_lines(run_dir, "val", "test") == reference
        assert _split_lines(run_dir, "train") == _split_lines(plain, "train")  # training untouched
        assert read_json(run_dir / "summary.json")["test"] == read_json(plain / "summary.json")["test"]
    # what is stored follows the adapter: pooled features for `none`, tokens (and pooled) for the CDTM
    entries = [e for e in list_caches() if e.kind == "features"]
    assert len(entries) == 2 and all(e.complete and e.images == 9 for e in entries)
    parts = {tuple(json.loads((Path(e.directory) / "meta.json").read_text())["parts"]) for e in entries}
    assert parts == ({("pooled",)} if strategy == "linear" else {("tokens", "pooled")})
    code, out, _ = invoke("eval", str(cached), "--json")  # `cdft eval` evaluates the images: the same numbers
    assert code == 0 and json.loads(out)["metrics"] == read_json(cached / "summary.json")["test"]


def test_train_views_repeat_the_augmentations_of_the_first_epochs(tmp_path_factory, tmp_path):
    """View v of image i is epoch v's augmentation of it: with 2 views, epochs 1-2 train exactly
    as without the cache; epoch 3 trains on epoch 1's views again (the approximation)."""
    root, split = engine_data(tmp_path_factory)
    plain, _ = _run(tmp_path, root, split, "plain", "--no-feature-cache", strategy="frt", epochs=3)
    views, err = _run(tmp_path, root, split, "views", "--train-views", "2", strategy="frt", epochs=3)
    assert "train, 24 images x 2 augmented views" in err and "view e mod 2" in err
    plain_lines, view_lines = metric_lines(plain), metric_lines(views)
    assert [line for line in view_lines if line["epoch"] <= 2] == [line for line in plain_lines if line["epoch"] <= 2]
    third = [(a["loss"], b["loss"]) for a, b in zip(plain_lines, view_lines, strict=True)
             if a["epoch"] == 3 and a["split"] == "train"]
    assert third and third[0][0] != third[0][1]
    assert read_json(views / "summary.json")["train_views"] == 2
    assert read_json(plain / "summary.json")["train_views"] is None
    assert yaml.safe_load((views / "config.yaml").read_text())["train_views"] == 2


def test_a_changed_weight_file_gives_a_new_cache(tmp_path_factory, tmp_path):
    import timm

    root, split = engine_data(tmp_path_factory)
    weights = tmp_path / "w.safetensors"

    def write(seed: int) -> None:
        torch.manual_seed(seed)
        model = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))

    args = ("--weights", str(weights))
    write(1)
    _, first = _run(tmp_path, root, split, "a", *args, strategy="linear", epochs=1)
    _, same = _run(tmp_path, root, split, "b", *args, strategy="linear", epochs=1)
    write(2)
    _, changed = _run(tmp_path, root, split, "c", *args, strategy="linear", epochs=1)
    assert first.count("feature cache built") == 2 and same.count("feature cache reused") == 2
    assert changed.count("feature cache built") == 2
    assert len([e for e in list_caches() if e.kind == "features"]) == 4


def test_feature_cache_options_are_checked_and_may_change_on_resume(tmp_path_factory, tmp_path):
    root, split = engine_data(tmp_path_factory)
    base = quick_args(root, split, strategy="linear")
    code, _, err = invoke(*base, "--train-views", "0")
    assert code == 2 and "--train-views must be at least 1" in err
    code, _, err = invoke(*base, "--train-views", "2", "--no-feature-cache")
    assert code == 2 and "drop --no-feature-cache" in err
    config = merge(RunConfig(), {"dataset": "breakhis", "data_root": root, "split_file": split, "val_fold": 1,
                                 "test_fold": 3, "backbone": "test_vit"}, source="test")
    (tmp_path / "config.yaml").write_text(dump_yaml(config))
    assert resolve_config({"feature_cache": False}, resume=str(tmp_path)).feature_cache is False
    with pytest.raises(UsageError, match="drop --train-views"):
        resolve_config({"train_views": 4}, resume=str(tmp_path))


def test_each_ranks_share_is_stored_in_the_batches_evaluate_uses(tmp_path_factory):
    """What keeps N processes exact (tests/test_distributed.py runs a 2-process staged run with
    the cache against 1-process evaluation): each rank's stored share yields the indices,
    labels and backbone outputs of that rank's evaluation loader, batch for batch, and the
    model gives the same logits from them as from the images."""
    from cdft_core.data.images import ImageDataset
    from cdft_core.data.transforms import eval_transform
    from cdft_core.models.model import build_model
    from cdft_core.strategy import apply_stage, build_strategy
    from cdft_core.training.distributed import DistInfo
    from cdft_core.training.evaluation import eval_loader
    from cdft_core.training.frozen import FeatureSource, eval_features
    from cdft_core.training.preflight import load_run_splits

    root, split = engine_data(tmp_path_factory)
    splits = load_run_splits(merge(RunConfig(), {"dataset": "breakhis", "data_root": root, "split_file": split,
                                                 "val_fold": 1, "test_fold": 3}, source="test"))
    torch.manual_seed(0)
    model = build_model("test_vit", "cdtm", len(splits.classes), pretrained=False, image_size=32).eval()
    apply_stage(model, build_strategy("frt").stages[0])
    dataset = ImageDataset(splits.root, splits.val, eval_transform(model.data_config))
    shares = []
    for rank in (0, 1):
        dist = DistInfo(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
        source = FeatureSource.of(model, "cdtm", images_key="k", root=root, precision="fp32", dist=dist)
        stored = eval_features(source, "val", dataset, splits.val["image_path"].tolist(), 4, 0)
        loader = eval_loader(dataset, dist, 4, 0)
        assert len(stored) == len(loader) == 2
        for (features, labels, indices), (images, target, index) in zip(stored, loader, strict=True):
            assert torch.equal(indices, index) and torch.equal(labels, target)
            with torch.no_grad():
                tokens, pooled = model.backbone.features(images)
                assert torch.equal(features.tokens, tokens) and torch.equal(features.pooled, pooled)
                assert torch.equal(model(features), model(images))
        shares.append(stored.indices.tolist())
        stored.store.close()
    assert sorted(set(shares[0] + shares[1])) == list(range(9)) and len(shares[0]) == len(shares[1]) == 5


# -- the store ----------------------------------------------------------------------------------
def _batches(dtype: torch.dtype, rows: int = 6, batch: int = 4) -> list[Features]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(rows, 3, 5, generator=generator).to(dtype)
    pooled = torch.randn(rows, 5, generator=generator).to(dtype)
    return [Features(tokens[i:i + batch], pooled[i:i + batch]) for i in range(0, rows, batch)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_stored_features_come_back_bit_for_bit_in_their_dtype(tmp_path, dtype):
    batches = _batches(dtype)
    store = open_store({"t": str(dtype)}, lambda: iter(batches), rows=6, contents="test", root="r",
                       cache_dir=str(tmp_path))
    assert store.status == "built"
    back = store.take([0, 5, 2])
    expected_tokens = torch.cat([b.tokens for b in batches])[[0, 5, 2]]
    assert back.tokens.dtype == dtype and torch.equal(back.tokens, expected_tokens)
    assert torch.equal(store.take(slice(4, 6)).pooled, batches[1].pooled)
    reopened = open_store({"t": str(dtype)}, lambda: pytest.fail("rebuilt"), rows=6, contents="test", root="r",
                          cache_dir=str(tmp_path))
    assert reopened.status == "reused" and torch.equal(reopened.take(slice(None)).tokens, torch.cat([b.tokens for b in batches]))
    half = open_store({"pooled only": 1}, lambda: iter(Features(None, b.pooled) for b in batches), rows=6,
                      contents="test", root="r", cache_dir=str(tmp_path))
    assert half.take([1]).tokens is None and half.take([1]).pooled.shape == (1, 5)


@pytest.mark.parametrize("damage", ["flip", "truncate", "no-meta"])
def test_a_corrupt_store_is_rebuilt(tmp_path, damage):
    batches = _batches(torch.float32)
    store = open_store({"k": 1}, lambda: iter(batches), rows=6, contents="test", root="r", cache_dir=str(tmp_path))
    folder = Path(store.directory)
    store.close()
    data = folder / "pooled.npy"
    if damage == "flip":
        raw = bytearray(data.read_bytes())
        raw[-1] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "truncate":
        data.write_bytes(data.read_bytes()[:-4])
    else:
        (folder / "meta.json").unlink()
    again = open_store({"k": 1}, lambda: iter(batches), rows=6, contents="test", root="r", cache_dir=str(tmp_path))
    assert again.status == "built" and torch.equal(again.take(slice(None)).pooled, torch.cat([b.pooled for b in batches]))


def test_the_size_is_told_before_building_and_a_full_disk_is_refused(tmp_path, monkeypatch):
    import shutil

    from cdft_core.data import cache_dir

    lines: list[str] = []
    batches = _batches(torch.float32, rows=4000, batch=1000)  # 4000 x (15 + 5) floats: 0.3 MB
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(cache_dir.shutil, "disk_usage", lambda _: usage._replace(free=10 * cache_dir.MB))
    with pytest.raises(CdftError, match=r"the feature cache needs 0 MB but .* has 10 MB free; .*--no-feature-cache"):
        open_store({"k": 2}, lambda: iter(batches), rows=4000, contents="big", root="r", cache_dir=str(tmp_path),
                   log=lines.append)
    assert lines == [f"feature cache: computing big (tokens 3x5 float32, pooled 5 float32), 0.3 MB, into "
                     f"{tmp_path / 'features'}"]
    assert not [p for p in (tmp_path / "features").iterdir() if not p.name.startswith(".locks")]  # nothing left


def test_cache_list_and_clear_show_and_free_feature_caches(tmp_path):
    store = open_store({"k": 3}, lambda: iter(_batches(torch.float32)), rows=6, contents="tiny features",
                       root="/data", cache_dir=str(tmp_path))
    code, out, _ = invoke("cache", "list", "--cache-dir", str(tmp_path))
    assert code == 0 and "features" in out and "tiny features" in out and "1 cache" in out
    code, out, _ = invoke("cache", "list", "--cache-dir", str(tmp_path), "--json")
    entry, = json.loads(out)
    assert (entry["kind"], entry["images"], entry["root"], entry["complete"]) == ("features", 6, "/data", True)
    code, out, err = invoke("cache", "clear", "--cache-dir", str(tmp_path))
    assert code == 0 and "removed 0 caches" in out and "left in place" in err  # open: a job reads it
    store.close()
    code, out, _ = invoke("cache", "clear", "--cache-dir", str(tmp_path))
    assert code == 0 and "removed 1 cache" in out and list_caches(str(tmp_path)) == []


def test_a_backbone_whose_code_changed_gives_a_new_key(tmp_path, monkeypatch):
    """Same weights, edited source (a plugin backbone installed editable, no new version):
    its stored features are not the new code's, so the key changes; unchanged code, same key."""
    import importlib

    from cdft_core.training.frozen import code_digest

    source = tmp_path / "h3_net.py"
    text = ("import torch\n\nclass Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
            "        self.fc = torch.nn.Linear(2, 2)\n\n    def forward(self, x):\n        return self.fc(x){}\n")
    source.write_text(text.format(""))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("h3_net")
    before = code_digest(module.Net())
    assert code_digest(module.Net()) == before
    assert code_digest(torch.nn.Sequential(module.Net(), torch.nn.ReLU())) == before  # torch's classes: its version
    source.write_text(text.format(" * 2"))
    module = importlib.reload(module)
    assert code_digest(module.Net()) != before
