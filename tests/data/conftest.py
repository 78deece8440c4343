"""Shared fixtures for the data-layer tests: offline mode, temp caches (the real data: tests/conftest.py)."""

import os

# Before datasets / huggingface_hub are imported: nothing may be downloaded.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import importlib.util
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# esam_hf/__init__.py imports the optimizer and trainer; if those are broken or unfinished, load the
# data subpackage on its own so these tests still judge the data layer.
try:
    import esam_hf  # noqa: F401
except ImportError:
    stub = types.ModuleType("esam_hf")
    stub.__path__ = [str(REPO / "esam_hf")]
    sys.modules["esam_hf"] = stub
    assert importlib.util.find_spec("esam_hf.data") is not None


@pytest.fixture(scope="session")
def cifar_train_small(cifar_dir):
    """200 stratified CIFAR-10 training images (20 per class) as a datasets.Dataset."""
    from esam_hf.data import load_splits, resolve_dataset

    train, _, _ = load_splits(resolve_dataset(str(cifar_dir)), max_train_samples=200)
    return train


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("ESAM_HF_CACHE", str(path))
    return path


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A throwaway datasets cache for datasets made up in a test, so they don't pile up in ~/.cache."""
    import datasets

    path = tmp_path / "hf_datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", path)
    return path


@pytest.fixture
def make_dataset(tmp_path, hf_cache):
    """Write a local dataset directory, one parquet file per split: make_dataset({"train": {"image": [...], ...}}).

    Image cells are PIL images, {"bytes", "path"} dicts (broken bytes included) or None; `features` defaults to
    an Image column "image" and, when the labels are ints, a ClassLabel "label" with as many names as needed.
    """
    import datasets

    def make(splits, features=None, name="ds"):
        root = tmp_path / name
        root.mkdir()
        for split, columns in splits.items():
            ds = datasets.Dataset.from_dict(columns, features=features or _default_features(splits))
            ds.to_parquet(root / f"{split}-00000-of-00001.parquet")
        return root

    return make


def _default_features(splits):
    import datasets

    labels = [v for columns in splits.values() for v in columns["label"]]
    if all(isinstance(v, int) for v in labels):
        label = datasets.ClassLabel(names=[f"c{i}" for i in range(max(labels) + 1)])
    else:
        label = datasets.Value("string")
    return datasets.Features({"image": datasets.Image(), "label": label})
