"""Which dataset to train on: built-in aliases, Hub ids, local directories, and loading checked splits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import datasets
import numpy as np

CIFAR10_SUBSET_DIR = Path(__file__).resolve().parent / "cifar10_subset"
KINDS = ("cifar", "imagenet")


class DataError(ValueError):
    """A dataset problem found before training starts: path, split, column or labels."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Where an image-classification dataset lives and how to read it.

    `kind` picks the input pipeline: "cifar" decodes 32x32 images once into a uint8 tensor and augments
    whole batches; "imagenet" applies timm transforms to PIL images lazily.
    `class_names` is only needed when the label column is a plain integer rather than a `ClassLabel`.
    """

    path: str
    image_column: str
    label_column: str
    train_split: str = "train"
    eval_split: str | None = "test"
    kind: str = "imagenet"
    class_names: tuple[str, ...] | None = None


BUILTIN_DATASETS = {
    "cifar10": DatasetSpec("uoft-cs/cifar10", "img", "label", "train", "test", "cifar"),
    "cifar100": DatasetSpec("uoft-cs/cifar100", "img", "fine_label", "train", "test", "cifar"),
    # ImageNet's `test` split is unlabelled (every label is -1): evaluate on `validation`.
    "imagenet": DatasetSpec("ILSVRC/imagenet-1k", "image", "label", "train", "validation", "imagenet"),
    "cifar10-subset": DatasetSpec(str(CIFAR10_SUBSET_DIR), "img", "label", "train", "test", "cifar"),
}


def resolve_dataset(
    name_or_path: str,
    image_column: str | None = None,
    label_column: str | None = None,
    *,
    kind: str | None = None,
    train_split: str | None = None,
    eval_split: str | None = None,
    class_names: list[str] | None = None,
) -> DatasetSpec:
    """Turn an alias (`cifar10`, `cifar100`, `imagenet`, `cifar10-subset`), a Hub id or a local directory into a spec.

    Built-ins are resolved without touching the data. Anything else is loaded once to find its columns
    (the first `Image` and the first `ClassLabel` feature unless given), its splits (`train`, then the
    first labelled one of `validation`/`test` for evaluation) and its kind (32x32 images mean "cifar").
    """
    overrides = dict(
        image_column=image_column, label_column=label_column, kind=kind,
        train_split=train_split, eval_split=eval_split,
        class_names=tuple(class_names) if class_names is not None else None,
    )
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if kind is not None and kind not in KINDS:
        raise DataError(f"kind must be one of {KINDS}, got {kind!r}")

    spec = BUILTIN_DATASETS.get(name_or_path)
    spec = spec or next((s for s in BUILTIN_DATASETS.values() if s.path == name_or_path), None)
    if spec is not None:
        return dataclasses.replace(spec, **overrides)
    return _inspect(name_or_path, **overrides)


def _inspect(path, image_column=None, label_column=None, kind=None, train_split=None, eval_split=None, class_names=None):
    splits = load_dataset_dict(path)
    train_split = train_split or "train"
    train = _get_split(splits, train_split, path)
    features = train.features
    image_column = image_column or _first_column(features, datasets.Image)
    label_column = label_column or _first_column(features, datasets.ClassLabel)
    if image_column is None or label_column is None:
        missing = "image column (an Image feature)" if image_column is None else "label column (a ClassLabel feature)"
        raise DataError(
            f"could not find the {missing} of {path!r}: its columns are {_describe(features)}. "
            "Pass image_column= / label_column= explicitly."
        )
    _check_columns(train, image_column, label_column, train_split, path)
    if eval_split is None:
        eval_split = next(
            (s for s in ("validation", "test") if s in splits and s != train_split and _is_labelled(splits[s], label_column)),
            None,
        )
    if kind is None:
        first = train.select_columns([image_column])[0][image_column] if len(train) else None
        kind = "cifar" if first is not None and first.size == (32, 32) else "imagenet"
    return DatasetSpec(str(path), image_column, label_column, train_split, eval_split, kind, class_names)


def load_dataset_dict(path: str) -> datasets.DatasetDict:
    """`datasets.load_dataset(path)`, with an error that says why when the path is neither local nor on the Hub."""
    local = Path(path).expanduser()
    if local.is_dir():
        return datasets.load_dataset(str(local))
    cause = None
    if not (str(path).startswith(("/", ".", "~")) or local.exists()):  # could be a Hub id
        try:
            return datasets.load_dataset(path)
        except (ConnectionError, FileNotFoundError) as e:  # DatasetNotFoundError is a FileNotFoundError
            cause = e
    offline = datasets.config.HF_HUB_OFFLINE or datasets.config.HF_DATASETS_OFFLINE
    why = " Offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): only Hub datasets already cached load." if offline and cause else ""
    raise DataError(
        f"{path!r} is neither a local directory nor a dataset reachable on the Hugging Face Hub.{why} "
        f"Built-in names: {', '.join(BUILTIN_DATASETS)}."
    ) from cause


def load_splits(
    spec: DatasetSpec, max_train_samples: int | None = None, max_eval_samples: int | None = None, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset | None, list[str]]:
    """Load the train and eval splits, check columns and labels, and subsample with every class in proportion.

    Subsets are stratified because CIFAR-style files are often sorted by class: the first N rows would be
    a single class. Everything is checked here so a bad dataset fails before any training step.
    """
    splits = load_dataset_dict(spec.path)
    train = _get_split(splits, spec.train_split, spec.path)
    eval_ = _get_split(splits, spec.eval_split, spec.path) if spec.eval_split else None
    checked = [(name, split) for name, split in ((spec.train_split, train), (spec.eval_split, eval_)) if split is not None]
    for name, split in checked:
        _check_columns(split, spec.image_column, spec.label_column, name, spec.path)
    class_names = _class_names(train, spec)
    for name, split in checked:
        _check_labels(_labels(split, spec.label_column), len(class_names), name, spec)
    train = _subsample(train, max_train_samples, seed, spec.label_column)
    eval_ = _subsample(eval_, max_eval_samples, seed, spec.label_column) if eval_ is not None else None
    return train, eval_, class_names


def stratified_indices(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices of `n` rows in random order, each class represented in proportion to its frequency.

    Each row gets the key (rank within its shuffled class + 0.5) / class size; the `n` smallest keys take
    floor or ceil of n * share rows from every class, however the rows are ordered on disk.
    """
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(labels))
    shuffled = labels[perm]
    counts = np.bincount(shuffled)
    by_class = np.argsort(shuffled, kind="stable")
    rank = np.empty(len(shuffled))
    rank[by_class] = np.arange(len(shuffled)) - (np.cumsum(counts) - counts)[shuffled[by_class]]
    keys = (rank + 0.5) / counts[shuffled]
    return rng.permutation(perm[np.argsort(keys, kind="stable")[:n]])


def _subsample(ds, n, seed, label_column):
    if n is None or n >= len(ds):
        return ds
    if n <= 0:
        raise DataError(f"max samples must be positive, got {n}")
    return ds.select(stratified_indices(_labels(ds, label_column), n, seed))


def _get_split(splits, name, path):
    if name not in splits:
        raise DataError(f"split {name!r} not found in {path!r}; available splits: {list(splits)}")
    return splits[name]


def _first_column(features, feature_type):
    return next((name for name, f in features.items() if isinstance(f, feature_type)), None)


def _describe(features):
    return ", ".join(f"{name} ({type(f).__name__})" for name, f in features.items())


def _check_columns(ds, image_column, label_column, split, path):
    missing = [c for c in (image_column, label_column) if c not in ds.column_names]
    if missing:
        raise DataError(
            f"column(s) {missing} not in split {split!r} of {path!r}; available columns: {ds.column_names}. "
            "Pass image_column= / label_column= to resolve_dataset."
        )
    if not isinstance(ds.features[image_column], datasets.Image):
        raise DataError(
            f"column {image_column!r} of {path!r} is {type(ds.features[image_column]).__name__}, not an Image; "
            f"columns: {_describe(ds.features)}"
        )


def _class_names(ds, spec):
    if spec.class_names is not None:
        return list(spec.class_names)
    feature = ds.features.get(spec.label_column)
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    raise DataError(
        f"label column {spec.label_column!r} of {spec.path!r} is {type(feature).__name__}, not a ClassLabel, "
        "so the class names are unknown: pass class_names= to resolve_dataset."
    )


def _labels(ds, label_column) -> np.ndarray:
    # select_columns + numpy format reads one Arrow column (and honours select() indices) without decoding images.
    return np.asarray(ds.select_columns([label_column]).with_format("numpy")[:][label_column])


def _is_labelled(ds, label_column):
    return label_column in ds.column_names and len(ds) > 0 and bool((_labels(ds, label_column) != -1).any())


def _check_labels(labels, num_classes, split, spec):
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"label column {spec.label_column!r} of split {split!r} holds {labels.dtype} values, not integer class ids "
            "(datasets' Dataset.class_encode_column converts strings)."
        )
    if len(labels) and (labels == -1).all():
        raise DataError(
            f"split {split!r} of {spec.path!r} has no labels (every {spec.label_column!r} is -1), so it cannot be "
            "trained or evaluated on; choose another split (for ImageNet evaluate on 'validation', not 'test')."
        )
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise DataError(
            f"split {split!r} of {spec.path!r} has {len(bad)} label(s) outside [0, {num_classes}) "
            f"(row {bad[0]}: {labels[bad[0]]}); check label_column / class_names."
        )
