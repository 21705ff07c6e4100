"""Safe image decoding: the one place that turns untrusted bytes into a model input.

Everything a visitor uploads goes through :func:`decode_image`, which refuses what cannot be
decoded cheaply and correctly, with an :class:`ImageError` that says what is wrong:

- empty, non-image, corrupt and truncated files;
- files over ``MAX_FILE_BYTES`` and images over ``MAX_PIXELS`` or ``MAX_SIDE`` — checked from
  the header, *before* any pixel is decoded, so a decompression bomb costs nothing;
- images under ``MIN_SIDE`` pixels on a side (a 1x1 image holds no picture to explain);
- formats outside a short allow-list (Pillow can also hand EPS files to Ghostscript).

What can be decoded is normalised to 8-bit RGB: 16-bit and float greyscale are rescaled rather
than clipped, CMYK and palette images are converted, transparency is composited over white,
animations give their first frame and EXIF orientation is applied. :func:`square_crop` then
takes the centre square and resizes it to a family's input size.

Example:
    >>> from surgery.images import load_image
    >>> x = load_image(open("cat.jpg", "rb").read(), size=64)   # [3, 64, 64] in [0, 1]
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

MAX_FILE_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 40_000_000  # a 40-megapixel photo decodes to 120 MB of RGB: the most we accept
MAX_SIDE = 16_384
MIN_SIDE = 8
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
_BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white, as browsers do

# Pillow's own bomb check applies to every Image.open in the process (Gradio's too): keep it at
# least as strict as ours. Between 1x and 2x the limit Pillow only warns; decode_image refuses.
Image.MAX_IMAGE_PIXELS = min(Image.MAX_IMAGE_PIXELS or MAX_PIXELS, MAX_PIXELS)


class ImageError(ValueError):
    """An input that is not an image this project can decode safely; the message says why."""


Source = bytes | bytearray | str | os.PathLike | BinaryIO


def _read_bytes(source: Source, name: str) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ImageError(f"{name}: cannot read the file ({exc.strerror or exc})") from None
        if size > MAX_FILE_BYTES:
            raise ImageError(f"{name}: the file is {size / 2**20:.1f} MiB; the limit is "
                             f"{MAX_FILE_BYTES / 2**20:.0f} MiB")
        data = path.read_bytes()
    else:
        data = source.read(MAX_FILE_BYTES + 1)
    if not data:
        raise ImageError(f"{name}: the file is empty")
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(f"{name}: the file is larger than the {MAX_FILE_BYTES / 2**20:.0f} MiB limit")
    return data


def _check_size(image: Image.Image, name: str) -> None:
    w, h = image.size
    if w * h > MAX_PIXELS or max(w, h) > MAX_SIDE:
        raise ImageError(f"{name}: the image is {w}x{h} pixels; the limit is {MAX_PIXELS / 1e6:.0f} "
                         f"megapixels and {MAX_SIDE} pixels a side")
    if min(w, h) < MIN_SIDE:
        raise ImageError(f"{name}: the image is only {w}x{h} pixels; it needs at least "
                         f"{MIN_SIDE} pixels on each side")


def _grey_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit integer and float greyscale, rescaled to 8 bits (``convert`` would clip at 255)."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scaled = values  # float images are taken to be in [0, 1]
    else:
        scaled = values / 65535.0  # "I" is how Pillow opens some 16-bit files
    grey = np.round(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), mode="RGB")


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    if image.mode.startswith("I") or image.mode == "F":
        return _grey_to_rgb(image)
    if (image.mode == "P" and "transparency" in image.info) or image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as exc:  # e.g. LAB: Pillow has no conversion to RGB
        raise ImageError(f"{name}: colour mode {image.mode} is not supported ({exc})") from None


def decode_image(source: Source, name: str = "image", draft_size: int | None = None) -> Image.Image:
    """Decode untrusted image data into an 8-bit RGB ``PIL.Image``, or raise :class:`ImageError`.

    ``source`` is the encoded bytes, a path or a binary file; ``name`` is how messages refer to
    it. ``draft_size`` lets JPEG decoding scale down in the DCT (much cheaper on large photos)
    while keeping both sides at least that large.
    """
    data = _read_bytes(source, name)
    try:
        with warnings.catch_warnings():
            # Between 1x and 2x Pillow's pixel limit Pillow only warns; the size check refuses.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: the image declares more than {MAX_PIXELS / 1e6:.0f} megapixels "
                         "(a decompression bomb?)") from None
    except Exception:  # Pillow's plugins raise many types for data they cannot identify
        raise ImageError(f"{name}: not an image file in a supported format "
                         f"({', '.join(FORMATS)})") from None
    _check_size(image, name)
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        if draft_size is not None and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()
        image = ImageOps.exif_transpose(image)
    except Exception as exc:  # truncated and corrupt files fail here, in plugin-specific ways
        raise ImageError(f"{name}: the {image.format} file is corrupt or truncated ({exc})") from None
    return _to_rgb(image, name)


def square_crop(image: Image.Image, size: int) -> Image.Image:
    """The centre square of ``image``, resized (antialiased) to ``size`` x ``size``.

    Cropping before resizing keeps the work bounded, even for a very long and thin image, and
    keeps pixels outside the square out of the resampling filter's reach.
    """
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB ``PIL.Image`` as a float tensor ``[3, H, W]`` in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_image(source: Source, size: int, name: str = "image") -> torch.Tensor:
    """Decode, centre-crop and resize: the model input ``[3, size, size]`` in [0, 1]."""
    return to_tensor(square_crop(decode_image(source, name, draft_size=size), size))


def model_view(image: Image.Image, size: int, grayscale: bool = False) -> Image.Image:
    """What a model reads from ``image``: the centre square at ``size`` x ``size``, in gray (ITU-R 601
    luma, replicated to RGB) for families trained on gray images.

    Example:
        >>> model_view(Image.new("RGB", (640, 480), (255, 0, 0)), 28, grayscale=True).getpixel((0, 0))
        (76, 76, 76)
    """
    square = square_crop(image, size)
    return square.convert("L").convert("RGB") if grayscale else square
