import io

import numpy as np
import PIL.Image
import pytest

from esam_hf.data import DataError, decode_image, to_rgb


def _rgb(image):
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == image.size
    return np.asarray(out)


def _modes():
    palette = [10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6)
    p = PIL.Image.new("P", (2, 1))
    p.putpalette(palette)
    p.putpixel((1, 0), 1)
    p_transparent = p.copy()
    p_transparent.info["transparency"] = 0
    rgba = PIL.Image.new("RGBA", (3, 1))
    rgba.putdata([(0, 0, 0, 0), (0, 0, 0, 255), (0, 100, 200, 128)])
    cmyk = PIL.Image.new("CMYK", (2, 1))
    cmyk.putdata([(0, 0, 0, 0), (255, 0, 0, 0)])
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    return {
        "L": PIL.Image.new("L", (3, 2), 77), "1": PIL.Image.new("1", (2, 2), 1), "P": p, "P+transparency": p_transparent,
        "RGBA": rgba, "LA": PIL.Image.new("LA", (1, 1), (40, 0)), "CMYK": cmyk,
        "I;16": PIL.Image.frombytes("I;16", (3, 1), values.tobytes()),
        "I": PIL.Image.fromarray(values.astype(np.int32)),
        "F": PIL.Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)),
    }


@pytest.mark.parametrize("mode", list(_modes()))
def test_every_mode_decodes_to_the_pixels_a_pipeline_sees(mode):
    from transformers.image_utils import load_image  # what `pipeline("image-classification")` calls

    image = _modes()[mode]
    assert np.array_equal(_rgb(image), np.asarray(load_image(image.copy())))


def test_exif_orientation_is_applied_as_at_inference():
    image = PIL.Image.new("RGB", (4, 2), (10, 20, 30))
    image.putpixel((0, 0), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif.tobytes(), quality=100)
    decoded = decode_image({"bytes": buf.getvalue(), "path": None})
    assert decoded.size == (2, 4)


def test_decode_image_from_bytes_and_errors():
    buf = io.BytesIO()
    PIL.Image.new("L", (4, 4), 9).save(buf, format="PNG")
    assert np.asarray(decode_image({"bytes": buf.getvalue(), "path": None})).shape == (4, 4, 3)
    with pytest.raises(DataError, match=r"cannot decode the image at row 7 \(path='broken.jpg'\)"):
        decode_image({"bytes": b"not an image", "path": "broken.jpg"}, where="at row 7")
