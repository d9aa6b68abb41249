"""Reading and writing 8-bit RGB images, strictly.

Training data must be 8-bit RGB photographs: a grayscale, alpha, palette, 16-bit or CMYK file
silently converted to RGB would change what the model learns from, so each is rejected with
an `ImageError` that names the file and the problem. Every image is decoded in full (a
truncated file fails here, not half-way through an epoch) and turned upright by its EXIF
orientation.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from lightbsr.files import atomic_write

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageError",
    "encode_png",
    "read_rgb",
    "write_image",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
PNG_COMPRESS_LEVEL = 3  # fixed, so the same pixels give the same bytes; level 6 costs 2x the CPU for 4% less

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_GRAY_MODES = {"1", "L", "I", "F"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SAVE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


class ImageError(ValueError):
    """An image that cannot be used; `reason` is a short tag (e.g. "truncated") for reports."""

    def __init__(self, name: str, reason: str, detail: str):
        self.name = name
        self.reason = reason
        self.detail = detail
        super().__init__(f"{name}: {reason}: {detail}")


def read_rgb(
    source: str | os.PathLike | bytes,
    name: str | None = None,
    *,
    min_size: int = 0,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Decode an 8-bit RGB image in full and apply its EXIF orientation -> uint8 (H, W, 3).

    `source` is a path or the file's bytes; `name` labels errors (default: the path).
    `min_size` is the smallest allowed side after orientation; `max_pixels` defaults to
    Pillow's decompression-bomb limit, which is enforced as an error rather than a warning.
    """
    data, name = _load_bytes(source, name)
    if not data:
        raise ImageError(name, "zero-byte", "the file is empty")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    image = _open(data, name, limit)
    _check_png_bit_depth(data, name)
    _check_mode(image, name)
    _decode_fully(image, name)
    image = _upright(image, name)
    width, height = image.size
    if min(width, height) < min_size:
        raise ImageError(name, "too small", f"{width}x{height} pixels, smaller than the minimum side {min_size}")
    return np.array(image, dtype=np.uint8)  # (H, W, 3)


def _load_bytes(source: str | os.PathLike | bytes, name: str | None) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), name or "<bytes>"
    path = Path(source)
    try:
        return path.read_bytes(), name or str(path)
    except OSError as error:
        raise ImageError(name or str(path), "unreadable", error.strerror or str(error)) from None


def _open(data: bytes, name: str, max_pixels: int | None) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            _check_pixel_count(image, name, max_pixels)
            return image
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
            raise ImageError(name, "decompression bomb", str(error)) from None
        except UnidentifiedImageError:
            raise ImageError(name, "not an image", "Pillow recognises no image format in its bytes") from None
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageError(name, "corrupt", str(error)) from None


def _check_pixel_count(image: Image.Image, name: str, max_pixels: int | None) -> None:
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            name, "decompression bomb", f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"
        )


def _check_png_bit_depth(data: bytes, name: str) -> None:
    """Pillow opens a 16-bit RGB PNG as 8-bit "RGB", dropping precision silently: read the header."""
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 25 and data[24] == 16:
        raise ImageError(name, "16-bit", "16 bits per channel; convert it to 8-bit RGB first")


def _check_mode(image: Image.Image, name: str) -> None:
    mode = image.mode
    if mode == "RGB":
        return
    if mode.startswith("I;16"):
        raise ImageError(name, "16-bit", f"16-bit mode {mode}; convert it to 8-bit RGB first")
    if mode in _GRAY_MODES:
        raise ImageError(name, "grayscale", f"single-channel mode {mode}; an RGB image is required")
    if mode in _ALPHA_MODES:
        raise ImageError(name, "alpha", f"mode {mode} has an alpha channel; flatten it to RGB first")
    if mode == "P":
        raise ImageError(name, "palette", "palette (indexed-colour) image; convert it to RGB first")
    if mode == "CMYK":
        raise ImageError(name, "cmyk", "CMYK colour space; convert it to RGB with a colour profile first")
    raise ImageError(name, "unsupported mode", f"mode {mode}; an 8-bit RGB image is required")


def _decode_fully(image: Image.Image, name: str) -> None:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; truncated images would pass silently")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageError(name, "truncated", f"decoding failed: {error}") from None


def _upright(image: Image.Image, name: str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError) as error:
        raise ImageError(name, "corrupt", f"unreadable EXIF orientation: {error}") from None


def encode_png(array: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 (H, W, 3) array; the same pixels always give the same bytes."""
    buffer = io.BytesIO()
    Image.fromarray(_checked_rgb(array, "array")).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def write_image(path: str | os.PathLike, array: np.ndarray, format: str | None = None, quality: int = 95) -> Path:
    """Write a uint8 (H, W, 3) array as PNG, JPEG or WebP (chosen by extension unless `format`).

    The file appears only when complete (`lightbsr.files.atomic_write`); on any error nothing is
    left behind. WebP is written lossless.
    """
    path = Path(path)
    image = Image.fromarray(_checked_rgb(array, str(path)))
    fmt = (format or _SAVE_FORMATS.get(path.suffix.lower(), "")).upper()
    if fmt not in {"PNG", "JPEG", "WEBP"}:
        raise ValueError(f"{path}: cannot tell the image format from {path.suffix!r}; use .png, .jpg or .webp")
    options: dict[str, dict[str, int | bool]] = {
        "PNG": {"compress_level": PNG_COMPRESS_LEVEL},
        "JPEG": {"quality": quality},
        "WEBP": {"lossless": True},
    }
    return atomic_write(path, lambda file: image.save(file, format=fmt, **options[fmt]))


def _checked_rgb(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"{name}: expected a uint8 (H, W, 3) array, got {array.dtype} {tuple(array.shape)}")
    return np.ascontiguousarray(array)
