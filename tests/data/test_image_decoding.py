import io

import numpy as np
import PIL.Image
import pytest

from esam_hf.data import DataError, decode_image, to_rgb


def _rgb(image):
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == image.size
    return np.asarray(out)


def test_greyscale_and_bilevel():
    assert _rgb(PIL.Image.new("L", (3, 2), 77)).tolist() == [[[77] * 3] * 3] * 2
    assert (_rgb(PIL.Image.new("1", (2, 2), 1)) == 255).all()


def test_palette_with_and_without_transparency():
    palette = [10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6)
    image = PIL.Image.new("P", (2, 1))
    image.putpalette(palette)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    assert _rgb(image).tolist() == [[[10, 20, 30], [200, 100, 50]]]
    image.info["transparency"] = 0  # palette entry 0 is fully transparent: composited onto white
    assert _rgb(image).tolist() == [[[255, 255, 255], [200, 100, 50]]]


def test_alpha_is_composited_onto_white():
    image = PIL.Image.new("RGBA", (3, 1))
    image.putdata([(0, 0, 0, 0), (0, 0, 0, 255), (0, 100, 200, 128)])
    out = _rgb(image)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [0, 0, 0]
    # alpha 128/255 over white: c * a + 255 * (1 - a)
    expected = [round(c * 128 / 255 + 255 * 127 / 255) for c in (0, 100, 200)]
    assert np.abs(out[0, 2].astype(int) - expected).max() <= 1
    la = PIL.Image.new("LA", (1, 1), (40, 0))
    assert _rgb(la).tolist() == [[[255, 255, 255]]]


def test_cmyk():
    image = PIL.Image.new("CMYK", (2, 1))
    image.putdata([(0, 0, 0, 0), (255, 0, 0, 0)])  # white, pure cyan
    assert _rgb(image).tolist() == [[[255, 255, 255], [0, 255, 255]]]


def test_high_bit_depth_greyscale_is_rescaled_not_clipped():
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    i16 = PIL.Image.frombytes("I;16", (3, 1), values.tobytes())
    assert _rgb(i16)[0, :, 0].tolist() == [0, 100, 255]
    as_int32 = PIL.Image.fromarray(values.astype(np.int32))
    assert as_int32.mode == "I"
    assert _rgb(as_int32)[0, :, 0].tolist() == [0, 100, 255]
    small = PIL.Image.fromarray(np.array([[0, 7, 255]], dtype=np.int32))
    assert _rgb(small)[0, :, 0].tolist() == [0, 7, 255]
    floats = PIL.Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert floats.mode == "F"
    assert _rgb(floats)[0, :, 0].tolist() == [0, 128, 255]


def test_decode_image_from_bytes_and_errors():
    buf = io.BytesIO()
    PIL.Image.new("L", (4, 4), 9).save(buf, format="PNG")
    assert np.asarray(decode_image({"bytes": buf.getvalue(), "path": None})).shape == (4, 4, 3)
    with pytest.raises(DataError, match=r"cannot decode the image at row 7 \(path='broken.jpg'\)"):
        decode_image({"bytes": b"not an image", "path": "broken.jpg"}, where="at row 7")
