"""Decoding dataset images into 3-channel RGB PIL images."""

from __future__ import annotations

import datasets
import numpy as np
import PIL.Image

from .specs import DataError

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_DECODER = datasets.Image()


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL image as 3-channel RGB, so every model sees the same input whatever the file held.

    Transparent pixels are composited onto white, as transformers' `convert_to_rgb` does, so training
    matches the image processor used at inference. High-bit-depth greyscale is rescaled, not clipped.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _to_8bit(image)
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _to_8bit(image: PIL.Image.Image) -> PIL.Image.Image:
    # PIL's own I/F -> L conversion clips at 255, which turns most 16-bit photos white.
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    if image.mode == "F":
        scale = 255.0 if values.max() <= 1.0 else 1.0  # float images are usually in [0, 1]
    else:
        # 16-bit PNG/TIFF open as I;16 (or I in older Pillow): map the 16-bit range onto 8 bits.
        scale = 255.0 / 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 1.0
    return PIL.Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8))


def decode_image(value, where: str = "") -> PIL.Image.Image:
    """Decode one cell of a `datasets.Image` column (bytes/path dict, path or PIL image) to RGB.

    `where` (e.g. "row 12 of split 'train'") goes into the error, together with the file name, so a
    corrupt file can be found.
    """
    try:
        image = _DECODER.decode_example(value)
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        path = value.get("path") if isinstance(value, dict) else value
        where = f" {where}" if where else ""
        raise DataError(f"cannot decode the image{where} (path={path!r}): {type(e).__name__}: {e}") from e
    return to_rgb(image)
