import datasets
import numpy as np
import pytest

from esam_hf.data import (
    CIFAR10_SUBSET_DIR,
    DataError,
    load_splits,
    resolve_dataset,
    stratified_indices,
)


def _write_parquet_dataset(root, splits):
    """A local dataset directory with one parquet file per split, like the Hub layout."""
    root.mkdir()
    for name, ds in splits.items():
        ds.to_parquet(root / f"{name}-00000-of-00001.parquet")
    return root


def _tiny_images(n, size=(8, 8)):
    import PIL.Image

    return [PIL.Image.new("RGB", size, (i * 10 % 256, 0, 0)) for i in range(n)]


def test_builtin_aliases_need_no_data():
    cifar10 = resolve_dataset("cifar10")
    assert (cifar10.path, cifar10.image_column, cifar10.label_column, cifar10.eval_split, cifar10.kind) == (
        "uoft-cs/cifar10", "img", "label", "test", "cifar")
    assert resolve_dataset("cifar100").label_column == "fine_label"
    imagenet = resolve_dataset("imagenet")
    assert (imagenet.path, imagenet.image_column, imagenet.eval_split, imagenet.kind) == (
        "ILSVRC/imagenet-1k", "image", "validation", "imagenet")
    # The Hub id itself maps to the same spec; explicit columns override it.
    assert resolve_dataset("uoft-cs/cifar100") == resolve_dataset("cifar100")
    assert resolve_dataset("cifar10", label_column="coarse").label_column == "coarse"
    subset = resolve_dataset("cifar10-subset")
    assert subset.path == str(CIFAR10_SUBSET_DIR) and subset.kind == "cifar"


def test_local_cifar_directory_is_recognised(cifar_dir):
    spec = resolve_dataset(str(cifar_dir))
    assert (spec.image_column, spec.label_column, spec.train_split, spec.eval_split, spec.kind) == (
        "img", "label", "train", "test", "cifar")


def test_local_imagenet_directory(imagenet_dir):
    with pytest.raises(DataError, match=r"split 'train' not found.*\['validation'\]"):
        resolve_dataset(str(imagenet_dir))
    spec = resolve_dataset(str(imagenet_dir), train_split="validation")
    assert (spec.image_column, spec.label_column, spec.eval_split, spec.kind) == ("image", "label", None, "imagenet")
    train, eval_, names = load_splits(spec)
    assert len(train) == 64 and eval_ is None and len(names) == 1000 and names[0] == "n01440764 tench"


def test_load_splits_subsets_are_stratified_and_seeded(cifar_dir):
    spec = resolve_dataset(str(cifar_dir))
    train, eval_, names = load_splits(spec, max_train_samples=200, max_eval_samples=50, seed=1)
    assert names[:3] == ["airplane", "automobile", "bird"]
    assert np.bincount(train["label"][:], minlength=10).tolist() == [20] * 10
    assert np.bincount(eval_["label"][:], minlength=10).tolist() == [5] * 10
    # The source is sorted by class, so a shuffled subset must not be.
    assert len(set(train["label"][:10])) > 3
    again, _, _ = load_splits(spec, max_train_samples=200, max_eval_samples=50, seed=1)
    other, _, _ = load_splits(spec, max_train_samples=200, max_eval_samples=50, seed=2)
    assert again["label"][:] == train["label"][:]
    assert other._fingerprint != train._fingerprint


def test_stratified_indices_are_proportional_for_imbalanced_classes():
    labels = np.repeat([0, 1, 2], [600, 300, 100])
    idx = stratified_indices(labels, 100, seed=0)
    assert len(set(idx.tolist())) == 100
    assert np.bincount(labels[idx]).tolist() == [60, 30, 10]


@pytest.mark.parametrize("labels, n, feature", [
    (np.repeat(np.arange(10), 5), 8, "ClassLabel"),  # --max_eval_samples 8 of 10 classes
    (np.array([0] * 20 + [1] * 20 + [2]), 10, "ClassLabel"),  # a class with a single image
    (np.repeat([0, 1], 10), 4, "int64"),  # plain integer labels
])
def test_stratified_subsets_where_datasets_stratified_split_refuses(labels, n, feature):
    """Why `stratified_indices` is not `train_test_split(stratify_by_column=)`: that refuses these subsets."""
    label = datasets.ClassLabel(num_classes=int(labels.max()) + 1) if feature == "ClassLabel" else datasets.Value(feature)
    ds = datasets.Dataset.from_dict({"label": labels.tolist()}, features=datasets.Features({"label": label}))
    with pytest.raises(ValueError):
        ds.train_test_split(test_size=n, stratify_by_column="label", seed=0)
    idx = stratified_indices(labels, n, seed=0)
    counts = np.bincount(labels[idx], minlength=labels.max() + 1)
    expected = n * np.bincount(labels) / len(labels)
    assert len(set(idx.tolist())) == n and np.all(np.abs(counts - expected) < 1)  # floor or ceil of each share


def test_unknown_paths_and_hub_ids_fail_clearly(tmp_path):
    with pytest.raises(DataError, match="neither a local directory nor a dataset reachable on the Hugging Face Hub"):
        resolve_dataset(str(tmp_path / "does-not-exist"))
    with pytest.raises(DataError, match="(?s)neither a local directory.*Offline mode is on"):
        resolve_dataset("no-such-user/no-such-dataset")
    # Built-ins are resolved lazily: the error comes when the data is loaded.
    with pytest.raises(DataError, match="'uoft-cs/cifar100' is neither"):
        load_splits(resolve_dataset("cifar100"))


def test_missing_column_lists_the_columns(cifar_dir):
    with pytest.raises(DataError, match=r"\['image'\] not in split 'train'.*available columns: \['img', 'label'\]"):
        resolve_dataset(str(cifar_dir), image_column="image")
    # Built-ins skip inspection, so the same check runs when the splits are loaded.
    with pytest.raises(DataError, match=r"\['fine_label'\].*available columns: \['img', 'label'\]"):
        load_splits(resolve_dataset("cifar10-subset", label_column="fine_label"))


def test_label_errors(tmp_path, hf_cache):
    images = _tiny_images(6)
    plain_ints = datasets.Dataset.from_dict({"image": images, "y": [0, 1, 2, 0, 1, 5]}).cast_column("image", datasets.Image())
    root = _write_parquet_dataset(tmp_path / "ints", {"train": plain_ints})

    with pytest.raises(DataError, match="could not find the label column.*image \\(Image\\), y \\(Value\\)"):
        resolve_dataset(str(root))
    # Plain integers are classes 0..max, named after their ids (test_bad_data covers the details).
    assert load_splits(resolve_dataset(str(root), label_column="y"))[2] == ["0", "1", "2", "3", "4", "5"]
    with pytest.raises(DataError, match=r"1 label\(s\) outside \[0, 3\) \(row 5: 5\)"):
        load_splits(resolve_dataset(str(root), label_column="y", class_names=["a", "b", "c"]))


def test_unlabelled_eval_split_is_rejected(tmp_path, hf_cache):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    train = datasets.Dataset.from_dict({"image": _tiny_images(4), "label": [0, 1, 0, 1]}, features=features)
    test = datasets.Dataset.from_dict({"image": _tiny_images(3), "label": [-1, -1, -1]}, features=features)
    root = _write_parquet_dataset(tmp_path / "unlabelled", {"train": train, "test": test})

    # Auto-detection skips the unlabelled split...
    assert resolve_dataset(str(root)).eval_split is None
    # ...and asking for it explicitly fails before training.
    with pytest.raises(DataError, match="split 'test'.*has no labels.*-1"):
        load_splits(resolve_dataset(str(root), eval_split="test"))
