"""ImageNet and generic path: timm transforms applied lazily to decoded PIL images."""

from __future__ import annotations

from collections.abc import Mapping

import datasets
import timm.data
import torch

from .images import ROW_COLUMN, at_row, decode_image, number_rows, split_of


def timm_data_config(source: Mapping | torch.nn.Module | None = None) -> dict:
    """A complete timm data config (input_size, interpolation, mean, std, crop_pct, crop_mode).

    `source` is a timm model, its `pretrained_cfg`, or a partial dict; what is missing gets timm's ImageNet
    defaults. Build both the training transforms and the saved image processor from this one dict so
    they cannot disagree.
    """
    if isinstance(source, torch.nn.Module):
        return timm.data.resolve_model_data_config(source)
    return timm.data.resolve_data_config(pretrained_cfg={"input_size": (3, 224, 224), **dict(source or {})})


def image_transform(data_config: Mapping, is_training: bool):
    """timm transform from a data config: random resized crop + flip for training, resize + centre crop for eval.

    Colour jitter (on by default in timm) is off: the standard ResNet ImageNet recipe is crop + flip only.
    """
    config = timm_data_config(data_config)
    extra = {"color_jitter": None} if is_training else {}
    return timm.data.create_transform(**config, is_training=is_training, **extra)


class _DecodeAndTransform:
    # A class rather than a closure so DataLoader workers started with "spawn" can pickle it.
    def __init__(self, image_column: str, label_column: str, transform, split: str | None):
        self.image_column, self.label_column, self.transform, self.split = image_column, label_column, transform, split

    def __call__(self, batch: dict) -> dict:
        cells = zip(batch[ROW_COLUMN], batch[self.image_column])
        pixel_values = [self.transform(decode_image(value, where=at_row(row, self.split))) for row, value in cells]
        return {"pixel_values": pixel_values, "labels": batch[self.label_column]}


def with_image_transform(
    dataset: datasets.Dataset, image_column: str, label_column: str, transform, split: str | None = None
) -> datasets.Dataset:
    """The dataset with `transform` applied on access; rows become {"pixel_values": float [3, H, W], "labels": int}.

    Images are decoded here, not by `datasets`, so greyscale/alpha/16-bit files go through `to_rgb` and a
    bad image raises an error naming its split (`split`, default: the dataset's own split name), row and
    file. Rows are the numbers `load_splits` recorded; a dataset from elsewhere is numbered here (pass it
    before any `select`: see `number_rows`). Train with `remove_unused_columns=False`: the Trainer would
    otherwise drop the image column before the transform sees it.
    """
    if ROW_COLUMN not in dataset.column_names:
        dataset = number_rows(dataset)
    raw = dataset.cast_column(image_column, datasets.Image(decode=False))
    return raw.with_transform(_DecodeAndTransform(image_column, label_column, transform, split_of(dataset, split)))


def collate_images(features: list[dict] | Mapping) -> dict:
    """The one collator for both splits and both paths: {"pixel_values": float [B, 3, H, W], "labels": int64 [B]}.

    Transforms (augmentation for training only) belong to each split's dataset, so this only batches:
    a list of items (timm path, or any dataset indexed one item at a time) is stacked; a batch that is
    already finished (a Mapping, as `CifarTensorDataset.__getitems__` returns) is passed through unchanged.
    """
    if isinstance(features, Mapping):
        return features
    return {
        "pixel_values": torch.stack([f["pixel_values"] for f in features]),
        "labels": torch.tensor([int(f["labels"]) for f in features], dtype=torch.int64),
    }
