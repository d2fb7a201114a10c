"""The crop engine's decoding: real-world modes, EXIF orientation, animation, and every bad input."""

from __future__ import annotations

import io
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageFile

from dragonfly.config import ZoomConfig
from dragonfly.zoom import REASONS, ImageError, make_crops, open_image

CONFIG = ZoomConfig(resolution=28)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` RGB pixels but carries (almost) none."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + png_chunk(b"IEND", b"")
    )


def chelsea() -> Image.Image:
    return Image.fromarray(skimage.data.chelsea())


def low_tile(data, config=CONFIG) -> np.ndarray:
    """The low-resolution tile as (R, R, 3)."""
    return make_crops(data, config).pixels[0].transpose(1, 2, 0)


# ---------------------------------------------------------------------------------------------
# Modes


def test_grayscale_png_becomes_grey_rgb():
    grey = Image.fromarray(skimage.data.camera())
    rgb = open_image(encode(grey, "PNG"), CONFIG, source="camera.png")
    assert rgb.mode == "RGB" and rgb.size == grey.size
    arr = np.asarray(rgb)
    np.testing.assert_array_equal(arr[..., 0], np.asarray(grey))
    np.testing.assert_array_equal(arr[..., 0], arr[..., 2])


def test_rgba_transparency_is_composited_onto_white():
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., :3] = (200, 0, 0)  # red hidden under fully transparent pixels
    rgba[:, :10, 3] = 255  # opaque red stripe
    rgba[:, 10:20, 3] = 128  # half-transparent red
    rgb = np.asarray(open_image(encode(Image.fromarray(rgba), "PNG"), CONFIG, source="a.png"))
    assert (rgb[:, :10] == (200, 0, 0)).all()
    assert (rgb[:, 20:] == 255).all()  # transparent -> white, not the hidden red
    assert np.allclose(rgb[:, 10:20], (227, 127, 127), atol=1)


def test_palette_with_transparency_is_composited_onto_white():
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 255] + [0, 255, 0] * 255)
    pal.paste(1, (8, 0, 16, 16))
    data = encode(pal, "PNG", transparency=0)  # index 0 (blue) transparent
    rgb = np.asarray(open_image(data, CONFIG, source="p.png"))
    assert (rgb[:, :8] == 255).all()
    assert (rgb[:, 8:] == (0, 255, 0)).all()


def test_rgb_with_a_transparent_colour_is_composited_onto_white():
    rgb = np.zeros((8, 16, 3), np.uint8)
    rgb[:, 8:] = (10, 200, 30)
    data = encode(Image.fromarray(rgb), "PNG", transparency=(0, 0, 0))  # black is transparent
    out = np.asarray(open_image(data, CONFIG, source="rgb-key.png"))
    assert (out[:, :8] == 255).all() and (out[:, 8:] == (10, 200, 30)).all()


def test_la_image_is_composited_onto_white():
    la = Image.merge("LA", [Image.new("L", (8, 8), 50), Image.new("L", (8, 8), 0)])
    assert (np.asarray(open_image(encode(la, "PNG"), CONFIG, source="la.png")) == 255).all()


def test_cmyk_jpeg_is_converted():
    cmyk = chelsea().convert("CMYK")
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    rgb = np.asarray(open_image(data, CONFIG, source="cmyk.jpg")).astype(int)
    assert np.abs(rgb - skimage.data.chelsea()).mean() < 6  # JPEG loss only


def test_16_bit_png_keeps_its_tones():
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))  # black to white
    data = encode(Image.fromarray(ramp), "PNG")
    decoded = Image.open(io.BytesIO(data))
    assert decoded.mode == "I;16"
    assert (np.asarray(decoded.convert("RGB"))[:, 1:] == 255).all()  # what Pillow alone does: white
    rgb = np.asarray(open_image(data, CONFIG, source="ramp16.png"))
    np.testing.assert_array_equal(rgb[..., 1], (ramp >> 8).astype(np.uint8))
    assert rgb.min() == 0 and rgb.max() == 255


def test_32_bit_integer_grey_is_read_as_16_bit():
    values = np.array([[-5, 0, 256, 32768, 65535, 70000]], np.int32)
    rgb = np.asarray(open_image(Image.fromarray(values), CONFIG, source="i32"))
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 0, 1, 128, 255, 255])


def test_exif_rotated_jpeg_is_turned_upright():
    upright = chelsea()  # 451 x 300
    # Stored rotated by 90 degrees, with EXIF orientation 6 telling viewers to rotate it back.
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    crops = make_crops(data, CONFIG)
    assert crops.native_size == (451, 300)
    expected = make_crops(encode(upright, "JPEG", quality=95), CONFIG).pixels[0].astype(int)
    assert np.abs(crops.pixels[0].astype(int) - expected).mean() < 3  # same picture, same way up


def test_animated_gif_uses_its_first_frame():
    frames = [Image.new("RGB", (20, 10), colour) for colour in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    gif = Image.open(io.BytesIO(buf.getvalue()))
    assert gif.n_frames == 3
    gif.seek(2)  # even a PIL image left on another frame
    for image in (buf.getvalue(), gif):
        tile = low_tile(image)
        assert (tile == (255, 0, 0)).all()


def test_skimage_animated_gif_and_rgba_logo_decode():
    gif = Path(skimage.data.data_dir, "no_time_for_that_tiny.gif").read_bytes()
    assert make_crops(gif, CONFIG).native_size == (14, 25)
    logo = encode(Image.fromarray(skimage.data.logo()), "PNG")  # RGBA
    assert make_crops(logo, CONFIG).pixels.shape == (CONFIG.n_tiles, 3, 28, 28)


@pytest.mark.parametrize(
    "mode", ["1", "L", "P", "RGBA", "CMYK", "YCbCr", "LA", "PA", "I;16", "I", "F", "RGBa"]
)
def test_every_mode_gives_rgb(mode):
    img = chelsea().convert("L").convert(mode) if mode in ("I;16", "I", "F") else chelsea().convert(mode)
    rgb = open_image(img, CONFIG, source=mode)
    assert rgb.mode == "RGB" and rgb.size == (451, 300)


# ---------------------------------------------------------------------------------------------
# Bad input


def assert_reason(data, reason, config=CONFIG):
    with pytest.raises(ImageError) as info:
        make_crops(data, config, source="rec-42")
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.source, err.reason) == ("rec-42", reason), str(err)
    assert "rec-42" in str(err) and reason in str(err)


def test_reasons_are_the_documented_ones():
    assert REASONS == ("empty", "not_an_image", "truncated", "too_many_pixels", "zero_size", "decode_failed")


def test_empty_bytes():
    assert_reason(b"", "empty")
    assert_reason(bytearray(), "empty")


@pytest.mark.parametrize(
    "data", [b"hello, world", b"\x00" * 1000, b"%PDF-1.4\n" + b"x" * 100, b"<html></html>"]
)
def test_not_an_image(data):
    assert_reason(data, "not_an_image")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP"])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_truncated_files(fmt, keep):
    data = encode(chelsea(), fmt)
    assert_reason(data[: int(len(data) * keep)], "truncated")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF"])
def test_files_cut_inside_the_header_are_truncated(fmt):
    assert_reason(encode(chelsea(), fmt)[:30], "truncated")


def test_truncated_images_are_never_filled_in():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_png_data():
    data = bytearray(encode(chelsea(), "PNG"))
    start = data.index(b"IDAT") + 40
    data[start : start + 40] = b"\xff" * 40
    assert_reason(bytes(data), "decode_failed")


def test_pixel_limit_is_checked_before_decoding(monkeypatch):
    def no_decoding(self):
        raise AssertionError("decoded an image over the pixel limit")

    data = encode(chelsea(), "PNG")  # 451 x 300 = 135,300 pixels
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert_reason(data, "too_many_pixels", ZoomConfig(resolution=28, max_image_pixels=135_299))
    assert_reason(
        Image.open(io.BytesIO(data)), "too_many_pixels", ZoomConfig(resolution=28, max_image_pixels=1000)
    )


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bombs_are_refused_from_the_header():
    # 150 MP: over our default limit (120 MP), under Pillow's own error threshold (~179 MP).
    assert_reason(png_header_only(15_000, 10_000), "too_many_pixels", ZoomConfig())
    # 10 GP: Pillow's own DecompressionBombError maps to the same reason.
    assert_reason(png_header_only(100_000, 100_000), "too_many_pixels", ZoomConfig())


def test_zero_sized_images():
    assert_reason(png_header_only(0, 10), "zero_size")
    assert_reason(png_header_only(10, 0), "zero_size")
    assert_reason(Image.new("RGB", (0, 5)), "zero_size")


def test_image_error_message_names_source_and_cause_and_survives_pickling():
    err = ImageError("s3://bucket/x.jpg", "truncated", "cut at 10 bytes")
    assert str(err) == "s3://bucket/x.jpg: truncated: cut at 10 bytes"
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.source, copy.reason, copy.detail, str(copy)) == (
        err.source,
        err.reason,
        err.detail,
        str(err),
    )
