"""Safe image decoding: every kind of bad upload is refused with a message, every odd but valid one decoded right."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from surgery.images import (MAX_FILE_BYTES, MAX_PIXELS, MIN_SIDE, ImageError, decode_image, load_image,
                            square_crop)


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` but holds almost no data: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def gradient_rgb(width: int = 40, height: int = 30) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    pixels = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                             np.full((height, width, 1), 90, np.float32)], axis=2)
    return Image.fromarray(pixels.round().astype(np.uint8), "RGB")


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"hello, this is a text file\n" * 20, "not an image"),
    (b"%PDF-1.4\n" + bytes(range(256)) * 4, "not an image"),
    (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "not an image"),
])
def test_non_images_are_refused_with_the_reason(data, reason):
    with pytest.raises(ImageError, match=reason):
        decode_image(data, name="upload.png")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_refused(fmt):
    data = encode(gradient_rgb(200, 150), fmt)
    with pytest.raises(ImageError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2], name=f"half.{fmt.lower()}")


def test_corrupt_data_inside_a_valid_header_is_refused():
    data = bytearray(encode(gradient_rgb(64, 64)))
    data[60:200] = bytes(140)  # zero out part of the compressed stream (and its CRC)
    with pytest.raises(ImageError, match="corrupt or truncated"):
        decode_image(bytes(data))


@pytest.mark.parametrize("width, height", [(50_000, 50_000), (100_000, 100_000), (20_000, 4_000)])
def test_decompression_bombs_are_refused_from_the_header(width, height):
    data = png_header_only(width, height)
    assert len(data) < 200  # tiny file, huge declared image: must not be decoded
    with pytest.raises(ImageError, match="megapixels"):
        decode_image(data, name="bomb.png")


def test_an_overlong_side_is_refused_even_under_the_pixel_limit():
    with pytest.raises(ImageError, match="pixels a side"):
        decode_image(png_header_only(40_000, 16))


def test_oversized_files_are_refused_before_reading(tmp_path):
    path = tmp_path / "huge.png"
    with open(path, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(ImageError, match="MiB"):
        decode_image(path)
    with pytest.raises(ImageError, match="MiB"):
        decode_image(b"\x89PNG" + bytes(MAX_FILE_BYTES))


@pytest.mark.parametrize("size", [(1, 1), (MIN_SIDE - 1, 100), (100, 2)])
def test_tiny_images_are_refused(size):
    with pytest.raises(ImageError, match=f"{size[0]}x{size[1]} pixels"):
        decode_image(encode(Image.new("RGB", size, (10, 20, 30))))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ImageError, match="gone.png"):
        decode_image(tmp_path / "gone.png", name="gone.png")


def test_sixteen_bit_greyscale_is_rescaled_not_clipped():
    values = np.zeros((16, 32), np.uint16)
    values[:, :16], values[:, 16:] = 65535, 32896  # white, and 128/255 of full scale
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    out = np.asarray(decode_image(encode(image)))
    assert out.shape == (16, 32, 3)
    assert (out[:, :16] == 255).all() and (out[:, 16:] == 128).all()


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    out = np.asarray(decode_image(encode(cmyk, "JPEG", quality=95)))
    assert out.shape == (32, 32, 3)
    assert out[..., 0].mean() > 230 and out[..., 1].mean() < 25 and out[..., 2].mean() < 25


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 255))
    rgba.paste((0, 0, 255, 0), (0, 0, 10, 20))  # left half fully transparent blue
    out = np.asarray(decode_image(encode(rgba)))
    assert (out[:, :10] == 255).all()
    assert (out[:, 10:] == [255, 0, 0]).all()


def test_palette_images_keep_their_colours_and_transparency():
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30, 250, 250, 0] + [0] * 759)
    palette.paste(2, (0, 0, 8, 16))
    out = np.asarray(decode_image(encode(palette)))
    assert (out[:, :8] == [250, 250, 0]).all() and (out[:, 8:] == [10, 200, 30]).all()
    out = np.asarray(decode_image(encode(palette, transparency=2)))
    assert (out[:, :8] == 255).all() and (out[:, 8:] == [10, 200, 30]).all()


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animations_give_their_first_frame(fmt):
    frames = [Image.new("RGB", (24, 24), colour) for colour in ((255, 255, 255), (0, 0, 0), (128, 128, 128))]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0,
                  **({"lossless": True} if fmt == "WEBP" else {}))
    assert Image.open(io.BytesIO(data)).n_frames == 3
    out = np.asarray(decode_image(data))
    assert (out == 255).all()


def test_exif_orientation_is_applied():
    image = gradient_rgb(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = decode_image(encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (20, 40)


def test_large_jpegs_decode_at_a_reduced_scale_but_not_below_the_request():
    data = encode(gradient_rgb(2000, 1600), "JPEG")
    out = decode_image(data, draft_size=256)
    assert 256 <= min(out.size) < 1600


def test_square_crop_takes_the_centre_and_keeps_values():
    image = Image.new("RGB", (300, 100), (0, 0, 0))
    image.paste((200, 100, 50), (100, 0, 200, 100))  # the centre square
    out = np.asarray(square_crop(image, 64))
    assert out.shape == (64, 64, 3)
    assert (np.abs(out.astype(int) - [200, 100, 50]) <= 1).all()


def test_long_thin_images_are_cropped_before_resizing():
    out = square_crop(Image.new("RGB", (16_000, 10), (5, 6, 7)), 64)
    assert out.size == (64, 64)


def test_load_image_gives_the_model_input():
    x = load_image(encode(gradient_rgb(90, 60)), size=32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    # Red rises left to right, green top to bottom, blue is constant (90/255).
    assert (x[0, :, 1:] - x[0, :, :-1] >= -1e-6).all() and (x[1, 1:] - x[1, :-1] >= -1e-6).all()
    assert torch.allclose(x[2], torch.full((32, 32), 90 / 255), atol=1 / 255)


def test_pillow_limit_is_no_looser_than_ours():
    assert Image.MAX_IMAGE_PIXELS <= MAX_PIXELS
