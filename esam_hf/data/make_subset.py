"""Rebuild the CIFAR-10 subset shipped in `esam_hf/data/cifar10_subset/` (used by the offline demo),
or write a complete shuffled copy for the tests that need real data (`--all`):

    python -m esam_hf.data.make_subset /path/to/cifar10   # a local copy or the Hub id uoft-cs/cifar10
    python -m esam_hf.data.make_subset uoft-cs/cifar10 DATA/cifar10-jpeg --all
"""

from __future__ import annotations

import argparse
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq

from .specs import CIFAR10_SUBSET_DIR


def make_cifar10_subset(
    source: str, out_dir: str | Path = CIFAR10_SUBSET_DIR, train_per_class: int | None = 300,
    test_per_class: int | None = 100, seed: int = 0
) -> Path:
    """Write `train-00000-of-00001.parquet` / `test-00000-of-00001.parquet` with exactly N images per class
    (None: every image of the class).

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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", nargs="?", default="uoft-cs/cifar10", help="A local CIFAR-10 copy or its Hub id.")
    parser.add_argument("out_dir", nargs="?", default=str(CIFAR10_SUBSET_DIR), help="Default: the package's subset.")
    parser.add_argument("--all", action="store_true", help="Every image (a complete, shuffled copy).")
    opts = parser.parse_args()
    per_class = (None, None) if opts.all else (300, 100)
    print(make_cifar10_subset(opts.source, opts.out_dir, *per_class))
