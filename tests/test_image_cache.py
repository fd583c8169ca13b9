"""The decode-once image cache: the same tensors and metrics as decoding each time, a new
cache for changed inputs, one build for concurrent builders, corrupt caches rebuilt."""

from __future__ import annotations

import json
import os
import pickle
import re
import textwrap
import threading
from pathlib import Path

import pytest
import torch
import yaml
from helpers_data import DATA_CONFIG, copy_to_memory, hcrf_root, zip_tree
from helpers_engine import (
    engine_data,
    invoke,
    quick_args,
    read_json,
    run_subprocess,
    staged_args,
    staged_run,
    subprocess_env,
)

from cdft_core.data import image_cache
from cdft_core.data.cache_dir import list_caches
from cdft_core.data.image_cache import cache_for_tables, open_cache
from cdft_core.data.images import ImageDataset
from cdft_core.data.splits import prepare
from cdft_core.data.transforms import ResizeSpec, eval_transform, train_transform
from cdft_core.errors import CdftError

SPEC = ResizeSpec.from_data_config(DATA_CONFIG)


def _items(dataset, seed: int = 0) -> list[tuple[torch.Tensor, int]]:
    out = []
    for i in range(len(dataset)):
        torch.manual_seed(seed + i)  # the train transform draws from torch's generator
        out.append(dataset[i])
    return out


def _same(a, b) -> bool:
    return all(torch.equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b, strict=True))


def test_cached_images_are_the_decoded_ones_on_every_root(tmp_path_factory, local_root, table):
    """Train (augmented) and eval tensors from local, memory:// and zip:// caches, and from
    another dataset's PNG and TIFF images, equal decoding each time."""
    some = table.iloc[::3]
    hcrf = hcrf_root(tmp_path_factory)
    roots = {"local": (local_root, some),
             "memory": (copy_to_memory(local_root, "cdft-cache-test/BreaKHis_v1"), some),
             "zip": (zip_tree(local_root, tmp_path_factory.mktemp("cache-zip") / "data.zip"), some),
             "hcrf": (hcrf, prepare("hcrf", hcrf))}
    for kind, (root, rows) in roots.items():
        cache = cache_for_tables(root, [rows], DATA_CONFIG)
        assert cache is not None and cache.status == "built" and len(cache) == len(rows), kind
        for transform in (train_transform(DATA_CONFIG), eval_transform(DATA_CONFIG)):
            plain = _items(ImageDataset(root, rows, transform))
            cached = ImageDataset(root, rows, transform, cache)
            assert _same(_items(cached), plain), kind
            assert _same(_items(pickle.loads(pickle.dumps(cached))), plain), kind  # as loader workers get it
        assert cache_for_tables(root, [rows], DATA_CONFIG).status == "reused"
    assert len(list_caches()) == 4  # one per root


def test_changed_image_size_or_interpolation_gives_a_new_cache(tmp_path, local_root, table):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(local_root, root)
    rows = table.iloc[:4]
    first = open_cache(str(root), rows["image_path"], SPEC)
    assert open_cache(str(root), rows["image_path"], SPEC).directory == first.directory
    # another size, another interpolation: new caches; lanczos resizes as bicubic on tensors: the same one
    assert open_cache(str(root), rows["image_path"], ResizeSpec(32, 40, "bicubic")).directory != first.directory
    bilinear = ResizeSpec.from_data_config({**DATA_CONFIG, "interpolation": "bilinear"})
    assert open_cache(str(root), rows["image_path"], bilinear).directory != first.directory
    lanczos = ResizeSpec.from_data_config({**DATA_CONFIG, "interpolation": "lanczos"})
    assert open_cache(str(root), rows["image_path"], lanczos).directory == first.directory
    # a changed image: a new cache holding the new pixels, never the stale ones
    changed_path, other_path = rows["image_path"].iloc[1], rows["image_path"].iloc[2]
    changed = root / changed_path
    changed.write_bytes((root / other_path).read_bytes())
    again = open_cache(str(root), rows["image_path"], SPEC)
    assert again.status == "built" and again.directory != first.directory
    changed_row, other_row = again.rows([changed_path, other_path])
    assert torch.equal(again.image(changed_row), again.image(other_row))
    assert not torch.equal(first.image(first.rows([changed_path])[0]), again.image(changed_row))
    # the same bytes rewritten later (a new modification time): rebuilt too, not trusted
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    assert open_cache(str(root), rows["image_path"], SPEC).status == "built"


def test_concurrent_builders_build_once(local_root, table, monkeypatch):
    """A second builder waits on the lock while the first builds, then uses its cache."""
    root = local_root
    paths = table["image_path"].iloc[:6]
    waiting, fills = threading.Event(), []
    fill = image_cache._fill

    def slow_fill(*args, **kwargs):
        fills.append(1)
        assert waiting.wait(30), "the second builder never waited"
        return fill(*args, **kwargs)

    monkeypatch.setattr(image_cache, "_fill", slow_fill)
    results: dict[str, object] = {}

    def build(name: str) -> None:
        results[name] = open_cache(root, paths, SPEC, log=lambda line: waiting.set())

    first = threading.Thread(target=build, args=("first",))
    first.start()
    while not fills:  # the first builder holds the lock
        threading.Event().wait(0.01)
    build("second")
    first.join(30)
    assert len(fills) == 1
    assert results["first"].status == "built" and results["second"].status == "built by another process"
    assert results["first"].directory == results["second"].directory
    assert [e.complete for e in list_caches()] == [True]  # no temporary folder left


@pytest.mark.parametrize("damage", ["flip", "truncate", "no-meta", "other-meta"])
def test_truncated_or_corrupt_cache_is_rebuilt(local_root, table, damage):
    root = local_root
    paths = table["image_path"].iloc[:5]
    cache = open_cache(root, paths, SPEC)
    expected = [cache.image(i) for i in range(5)]
    data, meta = Path(cache.directory) / "images.npy", Path(cache.directory) / "meta.json"
    if damage == "flip":
        raw = bytearray(data.read_bytes())
        raw[-7] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "truncate":
        os.truncate(data, data.stat().st_size - 100)
    elif damage == "no-meta":
        meta.unlink()
    else:
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "shape": [5, 3, 8, 8]}))
    Path(cache.directory).with_name(f".tmp-{cache.key}-1-dead").mkdir()  # left by a killed builder
    del cache  # closed: nobody else has it open, so the rebuild removes the damaged folder
    again = open_cache(root, paths, SPEC)
    assert again.status == "built" and again.directory == str(data.parent)
    assert all(torch.equal(again.image(i), expected[i]) for i in range(5))
    assert [e.complete for e in list_caches()] == [True]


def test_reuse_only_mode_transform_checks_and_missing_images(local_root, table):
    root = local_root
    rows = table.iloc[:3]
    assert cache_for_tables(root, [rows], DATA_CONFIG, build=False) is None  # cdft eval never builds
    cache = cache_for_tables(root, [rows], DATA_CONFIG)
    assert cache_for_tables(root, [rows], DATA_CONFIG, build=False).directory == cache.directory
    with pytest.raises(CdftError, match="resized as"):
        ImageDataset(root, rows, eval_transform({**DATA_CONFIG, "input_size": (3, 16, 16)}), cache)
    with pytest.raises(CdftError, match="does not hold"):
        ImageDataset(root, table.iloc[:4], eval_transform(DATA_CONFIG), cache)
    with pytest.raises(CdftError, match="not found under data root"):
        open_cache(root, ["no/such/image.png"], SPEC)


def test_resume_may_switch_the_cache(tmp_path_factory, tmp_path):
    from cdft_core.config import RunConfig, dump_yaml, merge, resolve_config

    root, split = engine_data(tmp_path_factory)
    config = merge(RunConfig(), {"dataset": "breakhis", "data_root": root, "split_file": split, "val_fold": 1,
                                 "test_fold": 3, "backbone": "test_vit"}, source="test")
    (tmp_path / "config.yaml").write_text(dump_yaml(config))
    resumed = resolve_config({"cache": False, "cache_dir": str(tmp_path / "c")}, resume=str(tmp_path))
    assert resumed.cache is False and resumed.cache_dir == str(tmp_path / "c")


# -- whole runs: the same metrics with and without the cache --------------------------------
@pytest.mark.slow
def test_runs_with_and_without_cache_are_identical(tmp_path_factory, tmp_path):
    """The staged reference run (cache on, the default) against the same run decoding every
    image, with loader workers: every metric line, bit for bit; the same run again reuses
    the reference's cache, and so does `cdft eval`."""
    from cdft_core.training.evaluation import evaluate_checkpoint

    reference = staged_run(tmp_path_factory)
    root, split = engine_data(tmp_path_factory)
    args = staged_args(root, split)
    args[args.index("--num-workers") + 1] = "2"
    code, _, err = invoke(*args, "--output", str(tmp_path / "plain"), "--no-cache")
    assert code == 0, err
    assert "image cache" not in err
    assert (tmp_path / "plain" / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    assert read_json(tmp_path / "plain" / "summary.json")["test"] == read_json(reference / "summary.json")["test"]
    assert yaml.safe_load((tmp_path / "plain" / "config.yaml").read_text())["cache"] is False

    # the reference's cache (its cache dir was an earlier test's): the same run again, workers mapping it
    folder = re.findall(r"image cache (?:built|reused)\b.*, (\S+)$", (reference / "train.log").read_text(), re.M)[-1]
    cached = tmp_path / "cached"
    code, _, err = invoke(*args, "--output", str(cached), "--cache-dir", str(Path(folder).parent.parent))
    assert code == 0, err
    assert re.search(rf"image cache reused: .*, {re.escape(folder)}$", err, re.M), err
    assert (cached / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    code, out, err = invoke("eval", str(cached), "--json")
    assert code == 0, err
    assert json.loads(out)["metrics"] == read_json(cached / "summary.json")["test"]
    evaluation = evaluate_checkpoint(str(cached))
    assert evaluation.image_cache == folder and evaluation.metrics == json.loads(out)["metrics"]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_with_and_without_cache_are_identical(tmp_path_factory, tmp_path):
    """Two ranks open the cache at once: exactly one builds it, the other waits for it or
    reuses it; the run matches the uncached one exactly."""
    root, split = engine_data(tmp_path_factory)
    args = quick_args(root, split, strategy="full", epochs=1)
    statuses = tmp_path / "statuses.txt"
    env = subprocess_env(PYTHONPATH=os.pathsep.join(filter(None, [str(_status_recorder(tmp_path, statuses)),
                                                                  os.environ.get("PYTHONPATH")])))
    done = {}
    for name, extra in (("cached", ()), ("plain", ("--no-cache",))):
        done[name] = run_subprocess(*args, "--output", str(tmp_path / name), "--nproc-per-node", "2", *extra,
                                    env=env)
        assert done[name].returncode == 0, done[name].stderr[-3000:]
    ranks = dict(line.split(" ", 1) for line in statuses.read_text().splitlines())  # the plain run opens none
    assert sorted(ranks) == ["0", "1"], ranks
    assert sorted(ranks.values()) in (["built", "built by another process"], ["built", "reused"]), ranks
    assert "image cache" not in done["plain"].stderr
    assert read_json(tmp_path / "cached" / "summary.json")["world_size"] == 2
    assert (tmp_path / "cached" / "metrics.jsonl").read_text() == (tmp_path / "plain" / "metrics.jsonl").read_text()
    assert [e.complete for e in list_caches()] == [True]  # one cache, no temporary folder left


def _status_recorder(tmp_path: Path, statuses: Path) -> Path:
    """A folder for PYTHONPATH whose ``sitecustomize`` makes every process append
    ``<RANK> <status>`` to ``statuses`` for each image cache it opens: each rank's status.
    Building takes 3 s longer, so that the other rank asks while it runs."""
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(textwrap.dedent(f"""\
        import os
        import time

        from cdft_core.data import image_cache

        _open_cache, _fill = image_cache.open_cache, image_cache._fill


        def open_cache(*args, **kwargs):
            cache = _open_cache(*args, **kwargs)
            if cache is not None:
                with open({str(statuses)!r}, "a") as out:
                    out.write(f"{{os.environ.get('RANK', '-')}} {{cache.status}}\\n")
            return cache


        def slow_fill(*args, **kwargs):
            time.sleep(3)
            return _fill(*args, **kwargs)


        image_cache.open_cache, image_cache._fill = open_cache, slow_fill
    """))
    return folder
