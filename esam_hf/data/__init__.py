"""Data layer: dataset specs, the CIFAR fast path, timm transforms for ImageNet, and a throughput probe.

Typical use (see `build_datasets`):

    spec = resolve_dataset("cifar10")            # or a Hub id, or a local directory
    data = build_datasets(spec, max_train_samples=5000)
    Trainer(..., train_dataset=data.train_dataset, eval_dataset=data.eval_dataset, data_collator=data.collator,
            args=TrainingArguments(..., remove_unused_columns=False))

Transforms belong to each split's dataset (augmentation on the training split only; on the CIFAR fast
path `CifarAugment` runs once per batch in `CifarTensorDataset.__getitems__`), so the one collator
`data.collator` (`collate_images`, which only batches) serves training and evaluation alike.
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
from .images import decode_image, to_rgb
from .pipeline import DataBundle, build_datasets, measure_pipeline_throughput
from .specs import (
    BUILTIN_DATASETS,
    CIFAR10_SUBSET_DIR,
    DataError,
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
    "build_datasets",
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
