import datasets
import numpy as np

from esam_hf.data import CIFAR10_SUBSET_DIR, resolve_dataset

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_shipped_subset_loads_like_the_hub_dataset():
    files = sorted(p.name for p in CIFAR10_SUBSET_DIR.glob("*.parquet"))
    assert files == ["test-00000-of-00001.parquet", "train-00000-of-00001.parquet"]
    assert sum(p.stat().st_size for p in CIFAR10_SUBSET_DIR.iterdir()) < 3_000_000

    splits = datasets.load_dataset(str(CIFAR10_SUBSET_DIR))
    assert set(splits) == {"train", "test"}
    for split, per_class in (("train", 300), ("test", 100)):
        ds = splits[split]
        assert isinstance(ds.features["img"], datasets.Image)
        assert ds.features["label"] == datasets.ClassLabel(names=CIFAR10_NAMES)
        labels = np.asarray(ds["label"][:])
        assert np.bincount(labels, minlength=10).tolist() == [per_class] * 10
        assert len(set(labels[:20].tolist())) > 4  # shuffled, not sorted by class
        image = ds[0]["img"]
        assert image.size == (32, 32) and image.mode == "RGB"
    spec = resolve_dataset("cifar10-subset")
    assert spec.kind == "cifar" and spec.eval_split == "test"


def test_subset_keeps_the_source_jpeg_bytes(cifar_dir):
    raw = datasets.Image(decode=False)
    subset = datasets.load_dataset(str(CIFAR10_SUBSET_DIR), split="test").cast_column("img", raw)
    source = datasets.load_dataset(str(cifar_dir), split="test").cast_column("img", raw)
    by_name = {}
    for row in source.select_columns(["img"]).iter(batch_size=1000):
        by_name.update({v["path"]: v["bytes"] for v in row["img"]})
    rows = subset[:50]
    for value, label in zip(rows["img"], rows["label"]):
        assert value["bytes"] == by_name[value["path"]]
        assert value["path"].startswith(CIFAR10_NAMES[label])


def test_make_subset_all_writes_a_complete_shuffled_copy(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "cifar10-jpeg"
    done = subprocess.run([sys.executable, "-m", "esam_hf.data.make_subset", str(CIFAR10_SUBSET_DIR), str(out), "--all"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    raw = datasets.Image(decode=False)
    for split in ("train", "test"):
        copy = datasets.load_dataset(str(out), split=split).cast_column("img", raw)
        source = datasets.load_dataset(str(CIFAR10_SUBSET_DIR), split=split).cast_column("img", raw)
        assert sorted(v["path"] for v in copy["img"]) == sorted(v["path"] for v in source["img"])  # every image
        assert copy["img"][:50] != source["img"][:50]  # in another order
