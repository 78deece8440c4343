"""CIFAR fast path: decode a split once into a cached uint8 tensor, then augment whole batches at once.

Per-image PIL transforms cost more CPU than a small CIFAR network's GPU step; a batched gather on a
uint8 tensor keeps the input pipeline far ahead of the model, even with no DataLoader workers.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import tempfile
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError, is_disk_full
from .images import at_row, bad_images_error, decode_rows, raw_images, split_of

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
_CACHE_VERSION = 2  # bump when the cached layout or the decoding changes (2: decoded as load_image)

logger = logging.getLogger(__name__)


def cifar_data_config(num_classes: int = 10) -> dict:
    """timm-style data config for 32x32 CIFAR inputs (CIFAR-100 statistics for 100 classes, else CIFAR-10's)."""
    mean, std = (CIFAR100_MEAN, CIFAR100_STD) if num_classes == 100 else (CIFAR10_MEAN, CIFAR10_STD)
    return {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": mean, "std": std,
            "crop_pct": 1.0, "crop_mode": "center"}


def default_cache_dir() -> Path:
    """`$ESAM_HF_CACHE`, else an `esam_hf` folder next to the datasets cache (follows HF_HOME / HF_DATASETS_CACHE)."""
    return Path(os.environ.get("ESAM_HF_CACHE") or Path(datasets.config.HF_DATASETS_CACHE) / "esam_hf")


def cifar_tensors(
    dataset: datasets.Dataset, image_column: str, label_column: str, cache_dir: str | Path | None = None,
    split: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 [N, 3, 32, 32] and labels as int64 [N], decoded once and cached on disk.

    The cache key is the dataset's fingerprint (which changes with the files, `select` indices, maps...)
    plus the column names, so a different subset or dataset never reuses a stale file. An unreadable
    cache file (truncated, or not what it should hold) is deleted and rebuilt. Images that cannot be
    decoded are all reported at once by `split` (default: the dataset's own split name) and row.
    """
    # `datasets` keeps the fingerprint private, but it is the one key that changes with the files, `select`
    # indices and maps; no public attribute does. The cache lives in our own folder (default_cache_dir), not
    # beside the Arrow files, so `Dataset.cleanup_cache_files()` leaves it: delete that folder to clear it.
    key = hashlib.sha256(f"{_CACHE_VERSION}|{dataset._fingerprint}|{image_column}|{label_column}".encode()).hexdigest()
    path = Path(cache_dir or default_cache_dir()) / f"cifar-{key[:20]}.pt"
    cached = _load_cache(path, len(dataset)) if path.exists() else None
    if cached is not None:
        return cached

    images = _decode_images(dataset, image_column, split_of(dataset, split))
    labels = torch.from_numpy(np.asarray(dataset.select_columns([label_column]).with_format("numpy")[:][label_column]))
    _write_cache(path, {"images": images, "labels": labels.long()})
    return images, labels.long()


def _write_cache(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # Write a temp file in the same folder, then rename (atomic): an interrupted run, or another process
    # (e.g. a second DDP rank) reading at the same time, never sees a half-written cache.
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(tensors, f)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, Exception) and is_disk_full(e):  # torch says only "unexpected pos"
            size = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
            raise OSError(errno.ENOSPC, f"No space left on device while writing the decoded CIFAR cache ({size:.0f} MB) "
                          f"in {path.parent}. Free space there, or set ESAM_HF_CACHE to a folder on a disk with room.") from e
        raise


def _load_cache(path: Path, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        cached = torch.load(path, mmap=True, weights_only=True)  # mmap: DataLoader workers share the pages
        images, labels = cached["images"], cached["labels"]
        if images.dtype != torch.uint8 or images.shape != (n, 3, 32, 32) or labels.shape != (n,):
            raise ValueError(f"it holds images {tuple(images.shape)} and labels {tuple(labels.shape)} for {n} rows")
    except Exception as e:  # torch reports a damaged file as RuntimeError, UnpicklingError, EOFError...
        # Files are renamed into place whole, so this is disk damage or a copy gone wrong: rebuilding is safe.
        logger.warning("CIFAR cache %s is unreadable (%s: %s); deleting it and decoding the split again.",
                       path, type(e).__name__, e)
        path.unlink(missing_ok=True)
        return None
    return images, labels


def _decode_images(dataset: datasets.Dataset, image_column: str, split: str | None, chunk: int = 1000) -> torch.Tensor:
    raw = raw_images(dataset, image_column)
    out = np.empty((len(raw), 32, 32, 3), dtype=np.uint8)
    problems = []
    for start in range(0, len(raw), chunk):
        for i, (row, image, problem) in enumerate(decode_rows(raw, image_column, start, start + chunk), start):
            if problem:
                problems.append((row, problem))
            elif image.size != (32, 32):
                raise DataError(
                    f"the image {at_row(row, split)} is {image.size[0]}x{image.size[1]}; the CIFAR path needs 32x32 "
                    "images (use kind='imagenet' for other sizes)"
                )
            else:
                out[i] = np.asarray(image)
    if problems:
        raise bad_images_error(problems, split, len(raw))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


class CifarAugment:
    """The paper's CIFAR augmentation as a batch transform: uint8 [B, 3, 32, 32] -> float32 [B, 3, 32, 32].

    Training: random 32x32 crop of the image zero-padded by 4 pixels, horizontal flip with p=0.5,
    normalisation, then Cutout (a 16x16 square of zeros, centred on a random pixel and clipped at the
    borders, with p=0.5) on the normalised tensor. `train=False` only normalises.

    It belongs to a split's dataset (`CifarTensorDataset(images, labels, transform)`), which applies it to
    a whole batch at once, so the training split augments and the evaluation split does not, while one
    plain collator (`collate_images`) serves both, as `transformers.Trainer` has a single `data_collator`.

    `generator` makes the augmentation reproducible in the main process. Inside DataLoader workers the
    worker's own torch RNG is used instead (seeded per worker by the DataLoader), because every worker
    gets a copy of the same generator and would otherwise draw identical crops.
    """

    def __init__(
        self,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        train: bool = True,
        crop: bool = True,
        flip: bool = True,
        cutout: bool = True,
        padding: int = 4,
        cutout_size: int = 16,
        cutout_prob: float = 0.5,
        generator: torch.Generator | None = None,
    ):
        self.train, self.crop, self.flip, self.cutout = train, crop, flip, cutout
        self.padding, self.cutout_size, self.cutout_prob = padding, cutout_size, cutout_prob
        self.generator = generator
        # Normalising in 0..255 units saves a division over the whole batch.
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W] -> augmented (if training) and normalised float32 [B, C, H, W]."""
        gen = self.generator if torch.utils.data.get_worker_info() is None else None
        if self.train and (self.crop or self.flip):
            images = self._crop_flip(images, gen)
        x = images.float().sub_(self.mean).div_(self.std)
        if self.train and self.cutout:
            x = self._cutout(x, gen)
        return x

    def _crop_flip(self, images: torch.Tensor, gen) -> torch.Tensor:
        b, c, h, w = images.shape
        pad = self.padding if self.crop else 0
        # Zero padding in pixel space (black), as torchvision's RandomCrop(32, padding=4) on PIL images.
        padded = F.pad(images, (pad, pad, pad, pad))
        top = torch.randint(0, 2 * pad + 1, (b, 1), generator=gen)
        left = torch.randint(0, 2 * pad + 1, (b, 1), generator=gen)
        flip = torch.rand(b, 1, generator=gen) < 0.5 if self.flip else torch.zeros(b, 1, dtype=torch.bool)
        cols = torch.arange(w)
        rows = top + torch.arange(h)  # [b, h]
        cols = left + torch.where(flip, w - 1 - cols, cols)  # [b, w]; a flip reads the window right to left
        # A single gather crops and flips every image of the batch.
        return padded[
            torch.arange(b).view(b, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows[:, None, :, None], cols[:, None, None, :]
        ]

    def _cutout(self, x: torch.Tensor, gen) -> torch.Tensor:
        b, _, h, w = x.shape
        cy = torch.randint(0, h, (b, 1, 1), generator=gen)
        cx = torch.randint(0, w, (b, 1, 1), generator=gen)
        apply = torch.rand(b, 1, 1, generator=gen) < self.cutout_prob
        y0, x0 = cy - self.cutout_size // 2, cx - self.cutout_size // 2
        ys, xs = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
        # Comparing against the unclipped square clips it at the borders (DeVries & Taylor, 2017).
        mask = apply & (ys >= y0) & (ys < y0 + self.cutout_size) & (xs >= x0) & (xs < x0 + self.cutout_size)
        return x.masked_fill_(mask.unsqueeze(1), 0.0)


class CifarTensorDataset(torch.utils.data.Dataset):
    """A decoded CIFAR split (uint8 images [N, 3, 32, 32], int64 labels [N]) with its `CifarAugment`.

    A DataLoader calls `__getitems__` with a whole batch's indices: one gather from the uint8 tensor and
    one call of `transform` for the batch give {"pixel_values": float32 [B, 3, 32, 32], "labels": int64 [B]},
    which `collate_images` passes through unchanged. `__getitem__` gives a single example
    {"pixel_values": float32 [3, 32, 32], "labels": int} (a batch of one) for code that indexes items.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: CifarAugment):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.transform(self.images[i].unsqueeze(0))[0], "labels": int(self.labels[i])}

    def __getitems__(self, indices) -> dict:
        index = torch.as_tensor(indices, dtype=torch.int64)
        return {"pixel_values": self.transform(self.images[index]), "labels": self.labels[index].long()}
