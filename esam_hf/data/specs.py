"""Which dataset to train on: built-in aliases, Hub ids, local directories or files, and loading checked splits."""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
from pathlib import Path

import datasets
import numpy as np
from datasets.exceptions import DatasetGenerationError
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

from .errors import DataError, listed
from .images import at_row, decode_image, number_rows, raw_images

CIFAR10_SUBSET_DIR = Path(__file__).resolve().parent / "cifar10_subset"
KINDS = ("cifar", "imagenet")
NO_EVAL = "none"  # eval_split value that turns evaluation off (the command line cannot pass None)
# A single file loads as a one-split dataset named "train"; these formats keep `Image`/`ClassLabel` features.
FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
# Files `datasets` builds a local folder's splits from (an empty one fails the whole folder).
DATA_SUFFIXES = (".parquet", ".arrow", ".csv", ".json", ".jsonl")
IMAGE_SUFFIXES = frozenset(ImageFolder.EXTENSIONS)  # the files an image folder holds, as datasets reads them

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Where an image-classification dataset lives and how to read it.

    `kind` picks the input pipeline: "cifar" decodes 32x32 images once into a uint8 tensor and augments
    whole batches; "imagenet" applies timm transforms to PIL images lazily. `eval_split=None`: no evaluation.
    `class_names` overrides the names of a `ClassLabel` column or the ones derived from plain integer or
    string labels (see `load_splits`).
    """

    path: str
    image_column: str
    label_column: str
    train_split: str = "train"
    eval_split: str | None = "test"
    kind: str = "imagenet"
    class_names: tuple[str, ...] | None = None
    # With no evaluation split found: the share of the training split held out (seeded, stratified) to evaluate on.
    train_val_split: float = 0.0

    @property
    def eval_name(self) -> str | None:
        """The evaluated split as a card and a log should name it."""
        if self.eval_split is None and self.train_val_split:
            return f"validation ({self.train_val_split:.0%} of {self.train_split}, held out)"
        if self.eval_split is not None and self.eval_split == self.train_split:
            return f"{self.eval_split} (also the training split: the scores measure fit, not generalisation)"
        return self.eval_split


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
    train_val_split: float = 0.0,
) -> DatasetSpec:
    """Turn an alias (`cifar10`, `cifar100`, `imagenet`, `cifar10-subset`), a Hub id, a local directory or a
    single `.parquet`/`.arrow` file (one split, `train`) into a spec.

    Built-ins are resolved without touching the data. Anything else is loaded once to find its columns
    (the first `Image` and the first `ClassLabel` feature unless given), its splits (`train`, then the
    first labelled one of `validation`/`test` for evaluation) and its kind (32x32 images mean "cifar").
    `eval_split=None` keeps that default; `eval_split="none"` turns evaluation off. A dataset with no
    evaluation split found holds out `train_val_split` of its training split instead (as the transformers
    examples do; 0 = no evaluation), and says so.
    """
    if not (isinstance(train_val_split, (int, float)) and 0 <= train_val_split < 1):
        raise DataError(f"train_val_split must be in [0, 1) (a share of the training split; 0 = none), got {train_val_split!r}")
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
    spec = dataclasses.replace(spec, **overrides) if spec is not None else _inspect(name_or_path, **overrides)
    if spec.eval_split is not None and spec.eval_split.lower() == NO_EVAL:
        spec = dataclasses.replace(spec, eval_split=None)
    elif spec.eval_split is not None and spec.eval_split == spec.train_split:
        print(f"esam_hf: evaluating on the training split {spec.train_split!r} of {name_or_path}: the scores will "
              "measure fit, not generalisation (and the card says so).", file=sys.stderr)
    elif spec.eval_split is None and train_val_split:
        spec = dataclasses.replace(spec, train_val_split=float(train_val_split))
        logger.warning("%s has no evaluation split: holding out %.0f%% of %r (stratified, seeded) to evaluate on "
                       "(--train_val_split; 0 turns it off).", name_or_path, 100 * train_val_split, spec.train_split)
    return spec


def holdout_size(n: int, share: float) -> int:
    """Rows held out of a training split of `n` rows for validation."""
    return min(n - 1, max(1, round(share * n)))


def _inspect(path, image_column=None, label_column=None, kind=None, train_split=None, eval_split=None, class_names=None):
    splits = load_dataset_dict(path)
    train_split = train_split or "train"
    train = _get_split(splits, train_split, path, "train_split")
    features = train.features
    image_column = image_column or _first_column(features, datasets.Image)
    label_column = label_column or _first_column(features, datasets.ClassLabel)
    if image_column is not None and label_column is None and list(features) == [image_column]:
        _check_image_folder_classes(path)  # images only: an image folder whose labels datasets dropped
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
        kind = "cifar" if len(train) and _first_image(train, image_column, train_split).size == (32, 32) else "imagenet"
    return DatasetSpec(str(path), image_column, label_column, train_split, eval_split, kind, class_names)


def _check_image_folder_classes(path) -> None:
    """Why `datasets` gave an image folder no labels: it takes its images' folder names as the classes only
    when there are at least 2 and every image sits at the same depth."""
    local = Path(path).expanduser()
    images = [f for f in local.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES] if local.is_dir() else []
    classes = sorted({f.parent.name for f in images})
    if len(classes) == 1:
        raise DataError(
            f"{str(path)!r} is an image folder with one class: all its images sit in folders named {classes[0]!r}, "
            "and an image folder's classes are the names of the folders holding the images (e.g. train/cat/1.png, "
            "train/dog/2.png). A classifier needs at least 2 classes: add a folder per class."
        )
    if classes and len({len(f.relative_to(local).parts) for f in images}) > 1:
        raise DataError(
            f"{str(path)!r} is an image folder whose images are not all at the same depth, so datasets takes no "
            "classes from its folder names: put every image one folder below its split (train/cat/1.png), "
            "or pass label_column= for a labelled dataset."
        )


def _first_image(ds, image_column, split):
    return decode_image(raw_images(ds, image_column)[0][image_column], where=at_row(0, split))


def load_dataset_dict(path: str) -> datasets.DatasetDict:
    """`datasets.load_dataset(path)` for a Hub id or a directory, a one-split (`train`) dataset for a single
    `.parquet`/`.arrow` file, `load_from_disk` for a `save_to_disk` folder; an error that says why otherwise."""
    local = Path(path).expanduser()
    if local.is_file():
        return _load_file(local)
    if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
        loaded = datasets.load_from_disk(str(local))
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
    if local.is_dir():
        return _built(lambda: datasets.load_dataset(str(local)), local)
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


def _load_file(file: Path) -> datasets.DatasetDict:
    builder = FILE_BUILDERS.get(file.suffix.lower())
    if builder is None:
        raise DataError(
            f"{str(file)!r} is a file, but only {' / '.join(FILE_BUILDERS)} files keep image features when loaded "
            "on their own. Convert it (e.g. Dataset.to_parquet) or pass the dataset's directory."
        )
    return _built(lambda: datasets.load_dataset(builder, data_files={"train": str(file)}), file)


def _built(load, path: Path) -> datasets.DatasetDict:
    """`load()` of local files, with the errors `datasets` gives for files it cannot build into splits (a
    bare DatasetGenerationError, or "Instruction ... corresponds to no data") said in terms of the files."""
    try:
        return load()
    except DatasetGenerationError as e:
        cause = e.__cause__ or e
        empty = [str(f) for f in ([path] if path.is_file() else sorted(path.rglob("*"))) if f.is_file()
                 and not f.stat().st_size and f.suffix.lower() in DATA_SUFFIXES]
        if empty:
            raise DataError(f"{listed(empty)} {'is' if len(empty) == 1 else 'are'} empty (0 bytes), so {str(path)!r} "
                            "cannot be loaded: write the file(s) again, or remove them.") from e
        raise DataError(
            f"the files of {str(path)!r} cannot be read as one dataset ({type(cause).__name__}: {cause}). Every split "
            "needs the same columns with the same types: if they differ (labels that are integers in one split and "
            "strings in another, say), make them agree (e.g. with Dataset.cast_column) and write the files again."
        ) from e
    except ValueError as e:
        split = re.search(r'Instruction "([^"]+)" corresponds to no data', str(e))
        if split is None:
            raise
        raise DataError(f"split {split[1]!r} of {str(path)!r} has no rows, and datasets cannot load a folder with an "
                        "empty split: remove that split's files, or write them again with data.") from e


def load_splits(
    spec: DatasetSpec, max_train_samples: int | None = None, max_eval_samples: int | None = None, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset | None, list[str]]:
    """Load the train and eval splits, check columns and labels, and subsample with every class in proportion.

    Everything is checked here so a bad dataset fails before any training step. Labels that are not a
    `ClassLabel` get classes derived from both splits (`spec.class_names` overrides them): integers 0..max
    are named "0".."max"; strings are sorted and replaced by their ids, the same for both splits. Every row
    gets its number in the split (`ROW_COLUMN`), so errors about images name rows that can be looked up.
    Subsets are stratified because CIFAR-style files are often sorted by class: the first N rows would be
    a single class.
    """
    for option, n in (("max_train_samples", max_train_samples), ("max_eval_samples", max_eval_samples)):
        if n is not None and n <= 0:
            raise DataError(f"{option} must be a positive number of images (or None for the whole split), got {n}")
    splits = load_dataset_dict(spec.path)
    named = {"train": (spec.train_split, _get_split(splits, spec.train_split, spec.path, "train_split"))}
    if spec.eval_split is not None:
        named["eval"] = (spec.eval_split, _get_split(splits, spec.eval_split, spec.path, "eval_split"))
    for name, split in named.values():
        _check_columns(split, spec.image_column, spec.label_column, name, spec.path)
    raw_labels = {role: _labels(split, spec.label_column) for role, (_, split) in named.items()}
    class_names, labels = _class_ids(raw_labels, named, spec)
    _check_classes(labels, class_names, named, spec)

    sizes = {"train": max_train_samples, "eval": max_eval_samples}
    out = {}
    for role, (_, split) in named.items():
        split = number_rows(split)  # before subsampling, which `select`s
        if _is_text(raw_labels[role]):
            split = _with_class_ids(split, spec.label_column, labels[role], class_names)
        if role == "train" and "eval" not in named and spec.train_val_split:
            held = np.sort(stratified_indices(labels[role], holdout_size(len(split), spec.train_val_split), seed))
            kept = np.setdiff1d(np.arange(len(split)), held)
            out["eval"] = _subsample(split.select(held), labels[role][held], sizes["eval"], seed)
            split, labels[role] = split.select(kept), labels[role][kept]
        out[role] = _subsample(split, labels[role], sizes[role], seed)
    return out["train"], out.get("eval"), class_names


# Not `Dataset.train_test_split(stratify_by_column=)`: it needs a ClassLabel column, 2 rows of every class and
# n >= the number of classes, which plain labels, rare classes and `--max_eval_samples 8` of 10 classes are not.
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


def _subsample(ds, labels, n, seed):
    if n is None or n >= len(ds):
        return ds
    return ds.select(stratified_indices(labels, n, seed))


def _get_split(splits, name, path, option):
    if name not in splits:
        flag = f"--{option} NAME" + (f" (or {NO_EVAL} to skip evaluation)" if option == "eval_split" else "")
        raise DataError(
            f"split {name!r} not found in {path!r}; available splits: {list(splits)}. "
            f"Pass {flag}, i.e. {option}= in Python, to use one of them."
        )
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


def _labels(ds, label_column) -> np.ndarray:
    # select_columns + numpy format reads one Arrow column (and honours select() indices) without decoding images.
    return np.asarray(ds.select_columns([label_column]).with_format("numpy")[:][label_column])


def _is_text(labels) -> bool:
    return labels.dtype.kind in "OUS"


def _is_labelled(ds, label_column):
    if label_column not in ds.column_names or len(ds) == 0:
        return False
    labels = _labels(ds, label_column)
    return bool((labels != -1).any()) if labels.dtype.kind in "iu" else True


def _class_ids(raw_labels, named, spec):
    """The class names, and each split's labels as checked integer class ids."""
    for role, (name, _) in named.items():
        _check_not_missing(raw_labels[role], name, spec)
    if len({_is_text(values) for values in raw_labels.values()}) > 1:
        raise DataError(
            f"label column {spec.label_column!r} of {spec.path!r} holds strings in one split and numbers in the other "
            f"({', '.join(f'{name!r}: {raw_labels[role].dtype}' for role, (name, _) in named.items())}); make them agree."
        )
    class_names = _class_names(named["train"][1], raw_labels.values(), spec)
    labels = {role: _encode(values, class_names, named[role][0], spec) if _is_text(values) else values
              for role, values in raw_labels.items()}
    for role, (name, _) in named.items():
        _check_labels(labels[role], len(class_names), name, spec)
    return class_names, labels


def _check_not_missing(labels, split, spec):
    # Arrow nulls arrive as None in string columns and as NaN in integer ones.
    if labels.dtype == object:
        missing = np.flatnonzero([value is None for value in labels])
    else:
        missing = np.flatnonzero(np.isnan(labels)) if labels.dtype.kind == "f" else []
    if len(missing):
        raise DataError(
            f"split {split!r} of {spec.path!r} has {len(missing)} row(s) without a label in {spec.label_column!r} "
            f"(rows {listed([str(i) for i in missing])}); remove them (e.g. with Dataset.filter) or fill them in."
        )


def _class_names(train, labels, spec):
    if spec.class_names is not None:
        return list(spec.class_names)
    feature = train.features[spec.label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    values = np.concatenate(list(labels))
    if _is_text(values):
        names = sorted(set(values.tolist()))
        logger.info("label column %r of %r holds strings: %d classes, in sorted order: %s.",
                    spec.label_column, spec.path, len(names), _quoted(names))
        return names
    if values.dtype.kind not in "iu":
        raise DataError(
            f"label column {spec.label_column!r} of {spec.path!r} holds {values.dtype} values; it needs integer "
            "class ids, class-name strings or a ClassLabel feature. Check label_column."
        )
    used = np.unique(values)
    count = int(values.max()) + 1 if len(values) else 0
    if count > max(2 * len(used), len(used) + 10):  # before any list of `count` names is built
        raise DataError(
            f"label column {spec.label_column!r} of {spec.path!r} holds plain integers, and its largest label "
            f"{count - 1} would make a {count}-class model for {len(used)} distinct labels "
            f"({listed([str(v) for v in used[:20]])}): a typo or an outlier, not classes. Fix the labels, or give "
            "them a ClassLabel feature (or class_names=) that lists the classes."
        )
    names = [str(i) for i in range(count)]
    empty = len(names) - len(used)
    # Visible without logging set up: the classes a model gets are not to be guessed silently.
    message = (f"label column {spec.label_column!r} of {spec.path!r} is not a ClassLabel: {len(names)} classes named "
               f"'0'..'{len(names) - 1}' after its largest label")
    if empty:
        missing = np.setdiff1d(np.arange(len(names)), used)
        message += f", {empty} of them with no example ({listed([str(v) for v in missing[:20]])})"
    print(f"esam_hf: {message}; pass class_names= or give the column a ClassLabel feature to name them.", file=sys.stderr)
    logger.warning(message)
    return names


def _encode(values, class_names, split, spec):
    ids = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(set(values.tolist()) - ids.keys())
    if unknown:
        raise DataError(
            f"split {split!r} of {spec.path!r} has labels that are not class names: {_quoted(unknown)}; "
            f"the classes are {_quoted(class_names)}. Check class_names / label_column."
        )
    return np.array([ids[value] for value in values.tolist()], dtype=np.int64)


def _quoted(names):
    return listed([repr(name) for name in names])


def _with_class_ids(ds, label_column, ids, class_names):
    # Before subsampling: on a split without a `select` mapping, add_column adds one in-memory column.
    feature = datasets.ClassLabel(names=class_names)
    return ds.remove_columns([label_column]).add_column(label_column, ids, feature=feature)


def _check_labels(labels, num_classes, split, spec):
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"label column {spec.label_column!r} of split {split!r} holds {labels.dtype} values, not integer class ids; "
            "check label_column."
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


def _check_classes(labels, class_names, named, spec):
    train_name = named["train"][0]
    present = np.unique(labels["train"])
    if len(class_names) < 2 or len(present) < 2:
        raise DataError(
            f"split {train_name!r} of {spec.path!r} has {len(present)} class(es) in {spec.label_column!r} out of "
            f"{len(class_names)} ({_quoted(class_names)}); a classifier needs at least 2. Check label_column and train_split."
        )
    if "eval" in labels:
        unseen = np.setdiff1d(np.unique(labels["eval"]), present)
        if len(unseen):
            logger.warning(
                "evaluation split %r has %d class(es) absent from training split %r: %s. The model cannot learn them; "
                "their accuracy will be 0.",
                named["eval"][0], len(unseen), train_name, _quoted([class_names[i] for i in unseen]),
            )
