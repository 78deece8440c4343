"""Data layer: dataset specs, the CIFAR fast path, timm transforms for ImageNet, and a throughput probe.

Typical use (see `build_datasets`):

    spec = resolve_dataset("cifar10")            # or a Hub id, or a local directory
    data = build_datasets(spec, max_train_samples=5000)
    Trainer(..., train_dataset=data.train_dataset, eval_dataset=data.eval_dataset, data_collator=data.collator,
            args=TrainingArguments(..., remove_unused_columns=False))

Transforms belong to each split's dataset (augmentation on the training split only; on the CIFAR fast
path `CifarAugment` runs once per batch in `CifarTensorDataset.__getitems__`), so the one collator
`data.collator` (`collate_images`, which only batches) serves training and evaluation alike.

Bad data is a `DataError` (a ValueError) raised before training where it can be: splits, columns and
labels in `load_splits`; every image on the CIFAR path (decoded into its cache) and, on the timm path,
with `build_datasets(check_train_images=True, check_eval_images=True)` (`check_images`). Errors name the
split and the row (`ROW_COLUMN`, the row's number in the split before subsampling) and say what to do.
"""

from .cifar import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    CifarAugment,
    CifarTensorDataset,
    cifar_data_config,
    cifar_tensors,
    default_cache_dir,
)
from .errors import DataError
from .images import ROW_COLUMN, check_images, decode_image, to_rgb
from .pipeline import DataBundle, build_datasets, measure_pipeline_throughput
from .specs import (
    BUILTIN_DATASETS,
    CIFAR10_SUBSET_DIR,
    DatasetSpec,
    load_dataset_dict,
    load_splits,
    resolve_dataset,
    stratified_indices,
)
from .transforms import collate_images, image_transform, timm_data_config, with_image_transform

__all__ = [
    "BUILTIN_DATASETS",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR10_SUBSET_DIR",
    "CifarAugment",
    "CifarTensorDataset",
    "DataBundle",
    "DataError",
    "DatasetSpec",
    "ROW_COLUMN",
    "build_datasets",
    "check_images",
    "cifar_data_config",
    "cifar_tensors",
    "collate_images",
    "decode_image",
    "default_cache_dir",
    "image_transform",
    "load_dataset_dict",
    "load_splits",
    "measure_pipeline_throughput",
    "resolve_dataset",
    "stratified_indices",
    "timm_data_config",
    "to_rgb",
    "with_image_transform",
]
