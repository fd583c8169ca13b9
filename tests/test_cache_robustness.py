"""The image cache's directory, locks and failure modes: where it lives, what `cdft cache`
lists and clears (only caches), in-use caches, failed builds, full disks, broken locks,
shared machines. Split from test_image_cache.py, which checks what the cache holds."""
from __future__ import annotations

import errno
import json
import os
import pickle
import threading
from pathlib import Path

import pytest
import torch
from helpers_data import DATA_CONFIG
from helpers_engine import (
    invoke,
)

from cdft_core.data import cache_dir, image_cache
from cdft_core.data.cache_dir import clear_caches, list_caches
from cdft_core.data.image_cache import open_cache
from cdft_core.data.transforms import ResizeSpec
from cdft_core.errors import CdftError

SPEC = ResizeSpec.from_data_config(DATA_CONFIG)



def test_cache_dir_comes_from_the_environment_and_cli_lists_and_clears(tmp_path, local_root, table, monkeypatch):
    root = local_root
    assert cache_dir.images_dir() == Path(os.environ["CDFT_CACHE_DIR"]) / "images"  # conftest's temporary dir
    monkeypatch.delenv("CDFT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if not _has_platformdirs():
        assert cache_dir.default_cache_dir() == str(tmp_path / "xdg" / "cdft")
    mine = str(tmp_path / "mine")
    for size in (16, 24):
        open_cache(root, table["image_path"].iloc[:3], ResizeSpec(size, size, "bicubic"), cache_dir=mine)
    in_use = open_cache(root, table["image_path"].iloc[:3], ResizeSpec(8, 8, "bicubic"), cache_dir=mine)
    code, out, err = invoke("cache", "list", "--cache-dir", mine)
    assert code == 0, err
    assert "16x16 bicubic" in out and "24x24 bicubic" in out and "3 caches" in out and "MB" in out
    code, out, _ = invoke("cache", "list", "--cache-dir", mine, "--json")
    entries = json.loads(out)
    assert sorted(e["size"] for e in entries) == ["16x16", "24x24", "8x8"] and all(e["images"] == 3 for e in entries)
    unused = [e for e in entries if e["size"] != "8x8"]
    code, out, _ = invoke("cache", "clear", unused[0]["key"][:8], "--cache-dir", mine)
    assert code == 0 and "removed 1 cache" in out
    code, out, err = invoke("cache", "clear", "--cache-dir", mine)  # the one still open stays
    assert code == 0 and "removed 1 cache" in out and "freed" in out and "left in place" in err
    assert [e.size for e in list_caches(mine)] == ["8x8"] and in_use.image(0).shape == (3, 8, 8)
    del in_use  # closed: now it goes
    code, out, _ = invoke("cache", "clear", "--cache-dir", mine)
    assert code == 0 and "removed 1 cache" in out and list_caches(mine) == []
    code, _, err = invoke("cache", "list", "--cache-dir", "s3://bucket/cache")
    assert code == 2 and "must be a local directory" in err


def _has_platformdirs() -> bool:
    try:
        import platformdirs  # noqa: F401
    except ImportError:
        return False
    return True


def _flip_last_byte(cache) -> None:
    data = Path(cache.directory) / "images.npy"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))


def test_a_cache_in_use_is_moved_aside_not_deleted_and_read_errors_are_no_damage(local_root, table, monkeypatch):
    paths = table["image_path"].iloc[:4]
    user = open_cache(local_root, paths, SPEC)  # another job's, still open: mapped at open, before workers fork
    assert user._mapped is not None and pickle.loads(pickle.dumps(user))._mapped is None
    expected = user.image(1)
    with monkeypatch.context() as patch:  # EMFILE while verifying: an error, the cache left alone
        patch.setattr(image_cache, "file_digest", _raises(OSError(errno.EMFILE, "Too many open files")))
        with pytest.raises(CdftError, match="cannot read the image cache .*Too many open files"):
            open_cache(local_root, paths, SPEC)
    assert open_cache(local_root, paths, SPEC).status == "reused"
    _flip_last_byte(user)
    again = open_cache(local_root, paths, SPEC)
    assert again.status == "built" and again.directory == user.directory
    aside = [e for e in list_caches() if not e.complete]  # the damaged one, moved aside for its user
    assert len(aside) == 1 and aside[0].key == user.key and (Path(aside[0].directory) / "images.npy").is_file()
    assert torch.equal(user.image(1), expected)
    del user, again  # closed: the next rebuild deletes the damaged folder and the one set aside
    _flip_last_byte(open_cache(local_root, paths, SPEC))
    assert open_cache(local_root, paths, SPEC).status == "built"
    assert [e.complete for e in list_caches()] == [True]


def _raises(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc
    return fail


def test_waiters_stop_with_the_failed_builds_error(local_root, table, monkeypatch):
    """A process that waited for a build that failed raises its error instead of building again."""
    paths = table["image_path"].iloc[:4]
    waiting, fills, errors = threading.Event(), [], []
    fill = image_cache._fill

    def failing_fill(*args, **kwargs):
        fills.append(1)
        assert waiting.wait(30), "the second builder never waited"
        raise CdftError("cannot decode image 'bad.png': broken data")

    monkeypatch.setattr(image_cache, "_fill", failing_fill)

    def build() -> None:
        with pytest.raises(CdftError) as failed:
            open_cache(local_root, paths, SPEC)
        errors.append(str(failed.value))

    first = threading.Thread(target=build)
    first.start()
    while not fills:
        threading.Event().wait(0.01)
    with pytest.raises(CdftError, match="^cannot decode image 'bad.png': broken data$"):
        open_cache(local_root, paths, SPEC, log=lambda line: waiting.set())
    first.join(30)
    assert len(fills) == 1 and errors == ["cannot decode image 'bad.png': broken data"]
    monkeypatch.setattr(image_cache, "_fill", fill)  # a later attempt (it waited for nobody) builds again
    assert open_cache(local_root, paths, SPEC).status == "built"
    assert not (cache_dir.images_dir() / ".locks" / f"{open_cache(local_root, paths, SPEC).key}.failed").exists()


def test_a_full_disk_is_a_one_line_error(local_root, table, monkeypatch):
    monkeypatch.setattr(os, "posix_fallocate", _raises(OSError(errno.ENOSPC, "No space left on device")),
                        raising=False)
    with pytest.raises(CdftError, match="image cache needs .* MB free; pass --cache-dir on a larger disk"):
        open_cache(local_root, table["image_path"].iloc[:3], SPEC)
    assert list_caches() == []  # no temporary folder left


def test_reuse_only_tolerates_missing_images_and_unreadable_ones_are_one_line_errors(local_root, table, monkeypatch):
    paths = list(table["image_path"].iloc[:3])
    assert open_cache(local_root, [*paths, "no/such/image.png"], SPEC, build=False) is None  # cdft eval decodes
    with pytest.raises(CdftError, match="not found under data root"):  # a file where a folder should be
        open_cache(local_root, [*paths, f"{paths[0]}/inside.png"], SPEC)
    locked = os.path.join(local_root, paths[1])
    stat = os.stat

    def denied(path, *args, **kwargs):
        if os.fspath(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", locked)
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", denied)
    with pytest.raises(CdftError, match=f"^cannot read image '{paths[1]}' under data root .*: Permission denied$"):
        open_cache(local_root, paths, SPEC)
    assert open_cache(local_root, paths, SPEC, build=False) is None


def test_without_working_locks_the_cache_still_works(local_root, table, monkeypatch):
    """flock-less filesystems (NFS, Lustre: ENOLCK) and read-only cache dirs: no locks, same caches."""
    import fcntl

    paths = table["image_path"].iloc[:3]
    with monkeypatch.context() as patch:
        patch.setattr(fcntl, "flock", _raises(OSError(errno.ENOLCK, "No locks available")))
        assert open_cache(local_root, paths, SPEC).status == "built"
        assert open_cache(local_root, paths, SPEC).status == "reused"
        assert open_cache(local_root, paths, SPEC, build=False).status == "reused"
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if ".locks" in os.fspath(path):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    assert open_cache(local_root, paths, SPEC, build=False).status == "reused"


def test_clear_and_list_touch_only_caches(tmp_path, local_root, table):
    """`--cache-dir ~/project` with a project/images/benign folder: never listed, sized or cleared."""
    project = tmp_path / "project"
    user_data = project / "images" / "benign"
    user_data.mkdir(parents=True)
    (user_data / "a.png").write_bytes(b"mine")
    lookalike = project / "images" / ("0" * 32)  # a key's name, but not a cache of that key
    lookalike.mkdir()
    (lookalike / "meta.json").write_text(json.dumps({"key": "1" * 32}))
    (project / "images" / ".tmp-notes").mkdir()
    key = open_cache(local_root, table["image_path"].iloc[:3], SPEC, cache_dir=str(project)).key
    assert [(e.key, e.complete) for e in list_caches(str(project))] == [(key, True)]
    code, out, err = invoke("cache", "clear", "--cache-dir", str(project))
    assert code == 0 and "removed 1 cache" in out, err
    assert (user_data / "a.png").read_bytes() == b"mine" and lookalike.is_dir() and (project / "images" / ".tmp-notes").is_dir()


def test_list_and_clear_race_with_builds(local_root, table, monkeypatch, tmp_path):
    """A build's temporary folder renamed away while listed or cleared: skipped, not counted as freed."""
    key = open_cache(local_root, table["image_path"].iloc[:3], SPEC).key
    base = cache_dir.images_dir()
    building = base / f".tmp-{key}-7-abcdef12"
    building.mkdir()
    (building / "images.npy").write_bytes(b"0" * 1000)
    stat = Path.stat

    def publishing_stat(self, **kwargs):  # the build finishes just as its file is looked at
        if self == building / "images.npy" and building.exists():
            building.rename(tmp_path / "published")
        return stat(self, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "stat", publishing_stat)
        assert [e.complete for e in list_caches()] == [True]
    (tmp_path / "published").rename(building)
    assert sorted(e.complete for e in list_caches()) == [False, True]
    lock = cache_dir.lock

    def publishing_lock(base_, key_, kind, **kwargs):
        if building.exists():
            building.rename(tmp_path / "published-again")
        return lock(base_, key_, kind, **kwargs)

    monkeypatch.setattr(cache_dir, "lock", publishing_lock)
    removed, busy = clear_caches()
    assert [e.complete for e in removed] == [True] and busy == []


def test_cache_folders_are_private_and_others_caches_and_links_refused(tmp_path, local_root, table, monkeypatch):
    paths = table["image_path"].iloc[:3]
    mine = tmp_path / "fresh"
    cache = open_cache(local_root, paths, SPEC, cache_dir=str(mine))
    for folder in (mine, mine / "images", mine / "images" / ".locks", Path(cache.directory)):
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    shared = tmp_path / "shared" / "images"
    shared.mkdir(parents=True)
    shared.chmod(0o755)
    open_cache(local_root, paths, SPEC, cache_dir=str(shared.parent))
    assert shared.stat().st_mode & 0o777 == 0o755  # an existing folder keeps its mode
    linked = tmp_path / "linked" / "images" / ".locks"
    linked.mkdir(parents=True)
    victim = tmp_path / "victim"
    (linked / f"{cache.key}.use").symlink_to(victim)
    with pytest.raises(CdftError, match="symbolic link"):
        open_cache(local_root, paths, SPEC, cache_dir=str(linked.parent.parent))
    assert not victim.exists()
    other = os.stat(cache.directory).st_uid + 1
    monkeypatch.setattr(os, "getuid", lambda: other)  # the cache is now another user's
    assert open_cache(local_root, paths, SPEC, cache_dir=str(mine), build=False) is None
    with pytest.raises(CdftError, match="belongs to another user"):
        open_cache(local_root, paths, SPEC, cache_dir=str(mine))


