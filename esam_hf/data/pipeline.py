"""One call from a DatasetSpec to Trainer-ready datasets and their collator, and a throughput probe for benchmarks."""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import datasets
import torch

from .cifar import CifarAugment, CifarTensorDataset, cifar_data_config, cifar_tensors
from .images import check_images
from .specs import DatasetSpec, holdout_size, load_dataset_dict, load_splits
from .transforms import collate_images, image_transform, timm_data_config, with_image_transform


@dataclasses.dataclass
class DataBundle:
    """What `transformers.Trainer` needs; pass `remove_unused_columns=False` in its TrainingArguments.

    Each split's dataset carries its own transforms (augmentation for training only), so the one
    `collator` serves both splits, as the Trainer's single `data_collator`.
    """

    train_dataset: torch.utils.data.Dataset | None
    eval_dataset: torch.utils.data.Dataset | None
    collator: Callable
    class_names: list[str]
    data_config: dict  # input_size, mean, std, crop_pct, interpolation: save the image processor from this
    eval_split_size: int | None = None  # rows of the whole evaluation split, however many are evaluated


def build_datasets(
    spec: DatasetSpec,
    data_config: Mapping | None = None,
    *,
    train: bool = True,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
    crop: bool = True,
    flip: bool = True,
    cutout: bool = True,
    cache_dir: str | Path | None = None,
    generator: torch.Generator | None = None,
    check_train_images: bool = False,
    check_eval_images: bool = False,
    check_workers: int = 0,
) -> DataBundle:
    """Load `spec`'s splits and wrap them in the input pipeline its kind calls for.

    CIFAR-kind data at 32x32 input takes the fast path (decoded once to a cached uint8 tensor, batch
    augmentation by the training dataset: crop/flip/cutout flags and `generator` apply there). Any other combination, e.g. CIFAR upsampled for
    a 224-pixel model, uses timm's transforms from `data_config` (a timm data config or pretrained_cfg;
    None means CIFAR statistics for CIFAR, timm's ImageNet defaults otherwise).
    `train=False` skips the training split (evaluation only).

    Every image of a split is decoded before training when the CIFAR path builds its cache, and, on the
    timm path, when `check_train_images` / `check_eval_images` ask for it (`check_images` with
    `check_workers` processes; progress bars follow `datasets.disable_progress_bars()`): a bad image is
    then an error naming its split and row before the first step, not mid-epoch or at the first evaluation.
    """
    train_ds, eval_ds, class_names = load_splits(spec, max_train_samples, max_eval_samples, seed)
    if not train:
        train_ds = None
    input_hw = tuple(data_config["input_size"][-2:]) if data_config and "input_size" in data_config else None

    if spec.kind == "cifar" and input_hw in (None, (32, 32)):
        config = {**cifar_data_config(len(class_names)), **(data_config or {})}

        def wrap(ds, training, split):
            if training:
                augment = CifarAugment(config["mean"], config["std"], crop=crop, flip=flip, cutout=cutout, generator=generator)
            else:
                augment = CifarAugment(config["mean"], config["std"], train=False)
            images, labels = cifar_tensors(ds, spec.image_column, spec.label_column, cache_dir, split)
            return CifarTensorDataset(images, labels, augment)
    else:
        config = timm_data_config(data_config)
        checked = [(train_ds, spec.train_split, check_train_images), (eval_ds, spec.eval_name, check_eval_images)]
        for ds, split, check in checked:
            if ds is not None and check:
                check_images(ds, spec.image_column, split, num_workers=check_workers,
                             progress=datasets.is_progress_bar_enabled())

        def wrap(ds, training, split):
            transform = image_transform(config, training)
            return with_image_transform(ds, spec.image_column, spec.label_column, transform, split)

    return DataBundle(
        train_dataset=wrap(train_ds, True, spec.train_split) if train_ds is not None else None,
        eval_dataset=wrap(eval_ds, False, spec.eval_name) if eval_ds is not None else None,
        collator=collate_images,
        class_names=class_names,
        data_config=config,
        eval_split_size=_split_size(spec, eval_ds, max_eval_samples),
    )


def _split_size(spec: DatasetSpec, subset, max_samples: int | None) -> int | None:
    if subset is None or max_samples is None:  # the whole split, or none
        return len(subset) if subset is not None else None
    if spec.eval_split is None:  # held out of the training split
        return holdout_size(load_dataset_dict(spec.path)[spec.train_split].num_rows, spec.train_val_split)
    return load_dataset_dict(spec.path)[spec.eval_split].num_rows  # answered from the datasets cache


def measure_pipeline_throughput(
    dataset, collator: Callable, batch_size: int, num_batches: int, num_workers: int = 0, repeats: int = 3
) -> float:
    """Images per second of the input pipeline alone (loading, decoding, augmenting, collating): median of repeats.

    One untimed pass first starts the workers and warms caches, so the number is the steady state a
    training run sees. Compare it with the model's own images/s to tell whether data loading is the bottleneck.
    """
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, collate_fn=collator, num_workers=num_workers,
        persistent_workers=num_workers > 0, drop_last=True,
    )
    rates = []
    for attempt in range(repeats + 1):
        start, images = time.perf_counter(), 0
        for batch in itertools.islice(loader, num_batches):
            images += len(batch["labels"])
        if attempt > 0:
            rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates)
