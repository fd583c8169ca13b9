"""Shared test set-up: one thread per test process, isolated plugin switches, a fresh registry."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _image_cache_dir(monkeypatch, tmp_path_factory):
    """Image caches go to a fresh temporary directory, never to the user's ~/.cache."""
    monkeypatch.setenv("CDFT_CACHE_DIR", str(tmp_path_factory.mktemp("cdft-cache")))


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    """Each test sees the plugin switches it sets and a registry built after them."""
    for var in ("CDFT_PLUGINS", "CDFT_DISABLE_PLUGINS", "CDFT_STRICT_PLUGINS", "CDFT_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    from cdft_core.registry import reset_registry

    reset_registry()
    yield
    reset_registry()


# -- the image cache's tests (test_image_cache.py, test_cache_robustness.py) -----------------
@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    """No hub and nothing cached: pretrained weights can come only from a file. Returns the
    (empty) hub cache directory."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf" / "hub"


@pytest.fixture(scope="module")
def local_root(tmp_path_factory) -> str:
    """A small synthetic BreakHis tree, local."""
    from helpers_data import small_breakhis_root

    return small_breakhis_root(tmp_path_factory)


@pytest.fixture(scope="module")
def table(local_root):
    """Its split table (every image, every fold)."""
    from cdft_core.data.splits import prepare

    return prepare("breakhis", local_root)
