"""Rebuild the CIFAR-10 subset shipped in `esam_hf/data/cifar10_subset/` (used by the offline demo):

    python -m esam_hf.data.make_subset /path/to/cifar10   # a local copy or the Hub id uoft-cs/cifar10
"""

from __future__ import annotations

import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq

from .specs import CIFAR10_SUBSET_DIR


def make_cifar10_subset(
    source: str, out_dir: str | Path = CIFAR10_SUBSET_DIR, train_per_class: int = 300, test_per_class: int = 100, seed: int = 0
) -> Path:
    """Write `train-00000-of-00001.parquet` / `test-00000-of-00001.parquet` with exactly N images per class.

    The encoded image bytes are copied untouched (no re-encoding) with the same `img` / `label` features,
    so `datasets.load_dataset(out_dir)` reads it like the full dataset. Rows are shuffled, not class-sorted.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        ds = datasets.load_dataset(str(source), split=split)
        labels = np.asarray(ds.select_columns(["label"]).with_format("numpy")[:]["label"])
        picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(ds.features["label"].num_classes)]
        indices = rng.permutation(np.concatenate(picks))
        subset = ds.cast_column("img", datasets.Image(decode=False)).select(indices)
        # Written with pyarrow because Dataset.to_parquet leaves image columns uncompressed; zstd squeezes the
        # JPEG header every image repeats (3x smaller). The schema carries the features (Image, ClassLabel).
        table = subset.with_format("arrow")[:].cast(ds.features.arrow_schema)
        pq.write_table(table, out_dir / f"{split}-00000-of-00001.parquet", compression="zstd")
    return out_dir


if __name__ == "__main__":
    print(make_cifar10_subset(sys.argv[1] if len(sys.argv) > 1 else "uoft-cs/cifar10"))
