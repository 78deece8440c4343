"""Decoding dataset images into 3-channel RGB PIL images, and checking that every image of a split decodes."""

from __future__ import annotations

import datasets
import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from .errors import DataError, listed

# Every row's number in its split, recorded before subsampling (see `number_rows`): the numbers travel
# with the rows through `select` and into DataLoader workers, so a bad image is reported by a row a user
# can look up in `datasets.load_dataset(path, split=...)`.
ROW_COLUMN = "__row__"
_FIX = ("Fix or remove that row (e.g. with Dataset.filter); esam_hf.data.check_images (--check_images) "
        "lists every bad row of a split at once.")
_DECODER = datasets.Image()


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL image as 3-channel RGB exactly as a saved model's `pipeline` will see it: transformers'
    `load_image` (EXIF orientation applied, then PIL's `convert("RGB")`: alpha dropped, not composited;
    16-bit and float images converted by PIL's rules). Training on other pixels than inference sees
    would train a model for inputs it never gets."""
    from transformers.image_utils import load_image

    return load_image(image)


def at_row(row: int, split: str | None = None) -> str:
    """Where a cell is, for error messages: "at row 12 of split 'train'"."""
    return f"at row {row}" + (f" of split {split!r}" if split else "")


def split_of(dataset: datasets.Dataset, split: str | None = None) -> str | None:
    """`split`, else the split name `datasets.load_dataset` gave the dataset (kept through select, casts...)."""
    return split or (str(dataset.split) if dataset.split is not None else None)


def decode_image(value, where: str = "") -> PIL.Image.Image:
    """Decode one cell of a `datasets.Image` column (bytes/path dict, path or PIL image) to RGB.

    `where` (e.g. `at_row(12, "train")`) goes into the error, with the file's path when the cell has one,
    so a corrupt or missing image can be found.
    """
    try:
        return _decode(value)
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        where = f" {where}" if where else ""
        raise DataError(f"cannot decode the image{where}{_describe(value, e)}. {_FIX}") from e


def _decode(value) -> PIL.Image.Image:
    if value is None or (isinstance(value, dict) and value.get("bytes") is None and value.get("path") is None):
        raise DataError("the cell is null (no image)")
    return to_rgb(_DECODER.decode_example(value))


def _describe(value, error: Exception) -> str:
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    reason = str(error) if isinstance(error, DataError) else f"{type(error).__name__}: {error}"
    return (f" (path={path!r})" if path else "") + f": {reason}"


def number_rows(dataset: datasets.Dataset) -> datasets.Dataset:
    """`dataset` with `ROW_COLUMN` = 0..N-1. Call it before `select`: on a selected dataset `add_column`
    rewrites every row to disk first."""
    return dataset.add_column(ROW_COLUMN, np.arange(len(dataset)))


def raw_images(dataset: datasets.Dataset, image_column: str) -> datasets.Dataset:
    """The image column undecoded (plus `ROW_COLUMN` if present), whatever format or transform `dataset` has."""
    columns = [image_column] + [ROW_COLUMN] * (ROW_COLUMN in dataset.column_names)
    return dataset.with_format(None).select_columns(columns).cast_column(image_column, datasets.Image(decode=False))


def decode_rows(raw: datasets.Dataset, image_column: str, start: int, stop: int):
    """Yield (row, RGB image or None, problem or None) for positions start..stop of `raw` (see `raw_images`).

    A row is its `ROW_COLUMN` number if recorded, else its position; a problem reads "row 12 (path=...): why".
    """
    batch = raw[start:stop]
    cells = batch[image_column]
    for row, value in zip(batch.get(ROW_COLUMN, range(start, start + len(cells))), cells):
        image, problem = None, None
        try:
            image = _decode(value)
        except Exception as e:  # reported with every other bad row, see bad_images_error
            problem = f"row {row}{_describe(value, e)}"
        yield row, image, problem


def bad_images_error(problems: list[tuple[int, str]], split: str | None, total: int) -> DataError:
    """One error for every (row, problem) found in a split of `total` images, in row order."""
    lines = [problem for _, problem in sorted(problems)]
    where = f"split {split!r}" if split else "the dataset"
    body = listed(lines, sep="\n  ")
    return DataError(
        f"{len(lines)} of the {total} images of {where} cannot be decoded:\n  {body}\n"
        "Fix or remove these rows (e.g. with Dataset.filter) and run again."
    )


def check_images(
    dataset: datasets.Dataset, image_column: str, split_name: str | None = None, *, num_workers: int = 0,
    progress: bool = True,
) -> None:
    """Decode every image of `dataset`; raise one `DataError` listing all the bad rows, or return None.

    Run it before training: a corrupt image otherwise surfaces mid-epoch, or, in the evaluation split,
    only at the first evaluation. It costs one decoding pass (no augmentation, no model), shared by
    `num_workers` DataLoader processes. Rows are those `load_splits` recorded, else positions in `dataset`;
    `split_name` defaults to the dataset's own split name.
    """
    split = split_of(dataset, split_name)
    raw = raw_images(dataset, image_column)
    loader = torch.utils.data.DataLoader(_ChunkProblems(raw, image_column), batch_size=None, num_workers=num_workers)
    problems = []
    with tqdm(total=len(raw), unit="img", desc=f"Checking images of split {split!r}", disable=not progress) as bar:
        for count, found in loader:
            problems += [(row, problem) for row, problem in found]
            bar.update(count)
    if problems:
        raise bad_images_error(problems, split, len(raw))


class _ChunkProblems(torch.utils.data.Dataset):
    # Chunks rather than single images, so each DataLoader round trip carries a few hundred decodes.
    def __init__(self, raw: datasets.Dataset, image_column: str, size: int = 256):
        self.raw, self.image_column, self.size = raw, image_column, size

    def __len__(self) -> int:
        return -(-len(self.raw) // self.size)

    def __getitem__(self, k: int) -> tuple[int, list[tuple[int, str]]]:
        start, stop = k * self.size, min((k + 1) * self.size, len(self.raw))
        rows = decode_rows(self.raw, self.image_column, start, stop)
        return stop - start, [(row, problem) for row, _, problem in rows if problem]
