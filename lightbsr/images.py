"""Reading and writing images: strict 8-bit RGB for training, any common mode for inference.

Training data must be 8-bit RGB photographs: a grayscale, alpha, palette, 16-bit or CMYK file
silently converted to RGB would change what the model learns from, so `read_rgb` rejects each
with an `ImageError` that names the file and the problem.

Inference takes any of them: `decode_picture` turns a file into float RGB for the model plus
what is needed to write the result back like its source (alpha, gray, 16-bit), and
`encode_picture` writes it (`picture_pixels` quantises it to integer levels, `encode_pixels` writes
those; the tiled upscale quantises its bands into such levels as they come and calls `encode_pixels`).
Pillow decodes 16-bit RGB(A) PNGs to 8 bits and cannot write them, so 16-bit PNGs are read and
written by a small PNG codec here (zlib + numpy).

Every image is decoded in full (a truncated file fails here, not half-way through an epoch) and
turned upright by its EXIF orientation.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from lightbsr.files import atomic_write

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageError",
    "Picture",
    "decode_picture",
    "encode_picture",
    "encode_pixels",
    "encode_png",
    "picture_pixels",
    "quantise",
    "read_rgb",
    "write_color",
    "write_image",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
PNG_COMPRESS_LEVEL = 3  # fixed, so the same pixels give the same bytes; level 6 costs 2x the CPU for 4% less

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_GRAY_MODES = {"1", "L", "I", "F"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SAVE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_SHARDS_NEED = "training shards need 8-bit RGB images (`lightbsr upscale` and `evaluate` accept this one)"
JPEG_QUALITY = 95
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2 luma weights


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
    header = _png_header(data)
    if header is not None and header[2] == 16:
        raise ImageError(name, "16-bit", f"16 bits per channel; {_SHARDS_NEED}")


def _check_mode(image: Image.Image, name: str) -> None:
    mode = image.mode
    if mode == "RGB":
        return
    if mode.startswith("I;16"):
        raise ImageError(name, "16-bit", f"16-bit mode {mode}; {_SHARDS_NEED}")
    if mode in _GRAY_MODES:
        raise ImageError(name, "grayscale", f"single-channel mode {mode}; {_SHARDS_NEED}")
    if mode in _ALPHA_MODES:
        raise ImageError(name, "alpha", f"mode {mode} has an alpha channel; {_SHARDS_NEED}")
    if mode == "P":
        raise ImageError(name, "palette", f"palette (indexed-colour) image, mode P; {_SHARDS_NEED}")
    if mode == "CMYK":
        raise ImageError(name, "cmyk", f"CMYK colour space; {_SHARDS_NEED}")
    raise ImageError(name, "unsupported mode", f"mode {mode}; training shards need 8-bit RGB images")


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


# ----------------------------------------------------------------------------- any image, for inference


@dataclass
class Picture:
    """An image as the model sees it, plus what is needed to write the result back like its source."""

    rgb: np.ndarray  # float32 (H, W, 3) in [0, 1]; a gray image has three equal channels
    alpha: np.ndarray | None = None  # float32 (H, W) in [0, 1], or None
    gray: bool = False  # written back as one channel (ITU-R 601-2 luma of the RGB)
    bits: int = 8  # 8 or 16 per channel, for writing back
    format: str = "PNG"  # the source's format as Pillow names it (PNG, JPEG, WEBP, TIFF, BMP, ...)


def decode_picture(data: bytes, name: str, max_pixels: int | None = None, min_size: int = 0) -> Picture:
    """Decode any common image for inference, in full, upright by its EXIF orientation.

    Gray (1, L, I;16) is copied to three channels; alpha (RGBA, LA, transparent palettes) is kept
    apart; palette images become RGB(A); CMYK becomes RGB by Pillow's plain formula (no colour
    profile); 16-bit gray and RGB(A) keep their 16 bits in float32. Anything else (32-bit integer or
    float, LAB, ...) is an `ImageError` naming the file and the mode.
    """
    if not data:
        raise ImageError(name, "zero-byte", "the file is empty")
    image = _open(data, name, Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels)
    header = _png_header(data)
    if header is not None and header[2] == 16 and header[3] in _PNG_CHANNELS:  # 16-bit gray: Pillow reads I;16
        values, bits = _read_png16(data, name, header).astype(np.float32) / np.float32(65535), 16
    else:
        _decode_fully(image, name)
        values, bits = _pillow_values(image, name)
    color, alpha = _split(values)
    orientation = _orientation(image, name)
    color = _orient(color, orientation)
    alpha = None if alpha is None else _orient(alpha, orientation)
    height, width = color.shape[:2]
    if min(width, height) < min_size:
        raise ImageError(name, "too small", f"{width}x{height} pixels, smaller than the minimum side {min_size}")
    gray = color.shape[2] == 1
    rgb = np.repeat(color, 3, axis=2) if gray else color
    return Picture(np.ascontiguousarray(rgb), alpha, gray, bits, image.format or "PNG")


def _split(values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """float (H, W, C) with C in 1..4 -> colour (H, W, 1 or 3), alpha (H, W) or None."""
    if values.shape[2] in (2, 4):
        return values[..., :-1], np.ascontiguousarray(values[..., -1])
    return values, None


def _pillow_values(image: Image.Image, name: str) -> tuple[np.ndarray, int]:
    """A decoded Pillow image -> float32 (H, W, C) in [0, 1] (C: 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA), bits."""
    mode = image.mode
    if image.format == "TIFF" and mode in ("RGB", "RGBA") and max(_tiff_bits(image)) > 8:  # Pillow keeps 8 of them
        raise ImageError(name, "unsupported mode", "TIFF with more than 8 bits per colour channel; save it as PNG")
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.float32)[..., None] / 65535, 16
    converted = {"1": "L", "La": "LA", "PA": "RGBA", "RGBa": "RGBA", "RGBX": "RGB", "CMYK": "RGB", "YCbCr": "RGB"}
    if mode == "P":
        has_alpha = "transparency" in image.info or (image.palette is not None and image.palette.mode == "RGBA")
        image = image.convert("RGBA" if has_alpha else "RGB")
    elif mode in converted:
        image = image.convert(converted[mode])
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        raise ImageError(name, "unsupported mode", f"mode {mode}; expected gray, RGB, alpha, palette, CMYK or 16-bit")
    values = np.asarray(image)
    return (values.reshape(*values.shape[:2], -1).astype(np.float32) / np.float32(255)), 8


def _tiff_bits(image: Image.Image) -> tuple[int, ...]:
    bits = getattr(image, "tag_v2", {}).get(258, (8,))  # BitsPerSample
    return tuple(bits) if isinstance(bits, tuple) else (int(bits),)


def _orientation(image: Image.Image, name: str) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))  # EXIF Orientation
    except (OSError, SyntaxError, ValueError, KeyError, TypeError) as error:
        raise ImageError(name, "corrupt", f"unreadable EXIF orientation: {error}") from None


def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Turn (H, W, ...) upright as EXIF orientation 1-8 says (as `PIL.ImageOps.exif_transpose` does)."""
    turns = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, k=-1),
        7: lambda a: np.rot90(a, k=-1)[::-1],
        8: lambda a: np.rot90(a, k=1),
    }
    return np.ascontiguousarray(turns[orientation](array)) if orientation in turns else array


def encode_picture(picture: Picture, fmt: str, quality: int = JPEG_QUALITY) -> bytes:
    """File bytes of `picture` as PNG, JPEG (at `quality`) or WebP (lossless): `picture_pixels`, then
    `encode_pixels`. A format that cannot hold the picture (JPEG with alpha, anything but PNG at 16 bits)
    is a ValueError: pick the format with `lightbsr.inference.output_format`.
    """
    return encode_pixels(picture_pixels(picture), fmt, quality)


def quantise(values: np.ndarray, dtype: type[np.uint8] | type[np.uint16]) -> np.ndarray:
    """float values, clipped to [0, 1] -> levels of `dtype` (0..255 or 0..65535), rounding half to even."""
    return np.round(np.clip(values, 0, 1) * np.float32(np.iinfo(dtype).max)).astype(dtype)


def write_color(pixels: np.ndarray, rgb: np.ndarray, gray: bool) -> None:
    """Quantise float RGB (H, W, 3) into the colour channels of integer `pixels` (H, W, C), in place: the
    first three, or for a gray picture the first one, its ITU-R 601-2 luma (computed in float32)."""
    if gray:
        pixels[..., 0] = quantise(rgb @ _LUMA, pixels.dtype.type)
    else:
        pixels[..., :3] = quantise(rgb, pixels.dtype.type)


def picture_pixels(picture: Picture) -> np.ndarray:
    """The levels `encode_pixels` writes: uint8, or uint16 for a 16-bit picture, (H, W, C) with C = 1 gray,
    2 gray + alpha, 3 RGB or 4 RGBA."""
    height, width = picture.rgb.shape[:2]
    channels = (1 if picture.gray else 3) + (picture.alpha is not None)
    pixels = np.empty((height, width, channels), np.uint16 if picture.bits == 16 else np.uint8)
    write_color(pixels, picture.rgb, picture.gray)
    if picture.alpha is not None:
        pixels[..., -1] = quantise(picture.alpha, pixels.dtype.type)
    return pixels


def encode_pixels(pixels: np.ndarray, fmt: str, quality: int = JPEG_QUALITY) -> bytes:
    """File bytes of integer levels (H, W, C) as PNG, JPEG (at `quality`) or WebP (lossless).

    C is 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA); uint16 levels are written as a 16-bit PNG.
    Gray is written as one channel (WebP has no gray mode, so there it fills all three channels).
    A format that cannot hold the levels (JPEG with alpha, anything but PNG at 16 bits) is a ValueError.
    """
    fmt = {"JPG": "JPEG"}.get(fmt.upper(), fmt.upper())
    if fmt not in ("PNG", "JPEG", "WEBP"):
        raise ValueError(f"format: expected PNG, JPEG or WEBP, got {fmt}")
    if pixels.dtype not in (np.uint8, np.uint16) or pixels.ndim != 3 or not 1 <= pixels.shape[2] <= 4:
        raise ValueError(f"pixels: expected uint8 or uint16 (H, W, 1..4), got {pixels.dtype} {tuple(pixels.shape)}")
    bits, gray, alpha = pixels.dtype.itemsize * 8, pixels.shape[2] <= 2, pixels.shape[2] in (2, 4)
    if (bits == 16 and fmt != "PNG") or (alpha and fmt == "JPEG"):
        raise ValueError(f"{fmt} cannot hold a {bits}-bit picture{' with alpha' * alpha}")
    if bits == 16:
        return _png16_bytes(pixels)
    image = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    if fmt == "WEBP" and gray:
        image = image.convert("RGBA" if alpha else "RGB")
    options: dict[str, dict[str, int | bool]] = {
        "PNG": {"compress_level": PNG_COMPRESS_LEVEL},
        "JPEG": {"quality": quality},
        "WEBP": {"lossless": True},
    }
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options[fmt])
    return buffer.getvalue()


# ----------------------------------------------------------------------------- 16-bit PNG (Pillow reads it as 8-bit)

_PNG_CHANNELS = {
    2: 3,
    4: 2,
    6: 4,
}  # colour type -> samples per pixel (RGB, gray+alpha, RGBA) that Pillow cuts to 8 bits


def _png_header(data: bytes) -> tuple[int, int, int, int, int] | None:
    """(width, height, bit depth, colour type, interlace) from a PNG's IHDR, or None if not a PNG."""
    if data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 29:
        return None
    width, height, depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    return width, height, depth, color_type, interlace


def _read_png16(data: bytes, name: str, header: tuple[int, int, int, int, int]) -> np.ndarray:
    """A 16-bit RGB / gray+alpha / RGBA PNG -> uint16 (H, W, C), by the PNG specification (zlib + filters).

    Pure numpy, so much slower than Pillow's C decoder (the filters are undone one anti-diagonal at a time);
    16-bit gray PNGs, which Pillow reads in full, do not come here.
    """
    width, height, _, color_type, interlace = header
    if interlace:
        raise ImageError(name, "unsupported mode", "16-bit PNG that is interlaced; save it non-interlaced")
    idat = []
    for kind, body in _png_chunks(data, name):
        if kind == b"IDAT":
            idat.append(body)
        elif kind == b"tRNS":
            raise ImageError(name, "unsupported mode", "16-bit PNG with a transparent colour key (tRNS)")
    channels = _PNG_CHANNELS[color_type]
    stride = width * channels * 2
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as error:
        raise ImageError(name, "truncated", f"decoding failed: {error}") from None
    if len(raw) < height * (stride + 1):
        raise ImageError(name, "truncated", f"{len(raw)} bytes of pixel data, {height * (stride + 1)} expected")
    rows = np.frombuffer(raw, np.uint8, count=height * (stride + 1)).reshape(height, stride + 1)
    if rows[:, 0].max(initial=0) > 4:
        raise ImageError(name, "corrupt", f"unknown PNG filter type {rows[:, 0].max()}")
    pixels = _unfilter(rows[:, 1:].reshape(height, width, channels * 2), rows[:, 0])
    return pixels.reshape(height, stride).view(">u2").reshape(height, width, channels).astype(np.uint16)


def _png_chunks(data: bytes, name: str) -> list[tuple[bytes, bytes]]:
    chunks, offset = [], 8
    while offset + 12 <= len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind, body = data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length].rjust(4, b"\0"))
        if len(body) < length or zlib.crc32(kind + body) != crc:
            raise ImageError(name, "truncated", f"PNG chunk {kind!r} is cut short or fails its CRC")
        chunks.append((kind, body))
        if kind == b"IEND":
            return chunks
        offset += 12 + length
    raise ImageError(name, "truncated", "the PNG ends before its IEND chunk")


def _unfilter(filtered: np.ndarray, kinds: np.ndarray) -> np.ndarray:
    """Undo PNG's row filters (None, Sub, Up, Average, Paeth) on (H, W, bytes per pixel) uint8.

    A byte depends on its left, upper and upper-left neighbours only, all on earlier anti-diagonals,
    so each anti-diagonal is done at once with numpy (H + W steps instead of a loop per byte).
    """
    height, width, depth = filtered.shape
    out = np.zeros((height + 1, width + 1, depth), np.int32)  # row 0 and column 0: the zero neighbours
    values, kinds = filtered.astype(np.int32), kinds.astype(np.int32)
    for diagonal in range(height + width - 1):
        ys = np.arange(max(0, diagonal - width + 1), min(height, diagonal + 1))
        xs = diagonal - ys
        a, b, c = out[ys + 1, xs], out[ys, xs + 1], out[ys, xs]  # left, up, upper-left
        kind = kinds[ys][:, None]
        predictors = [a, b, (a + b) >> 1, _paeth(a, b, c)]
        predicted = np.select([kind == 1, kind == 2, kind == 3, kind == 4], predictors, 0)
        out[ys + 1, xs + 1] = (values[ys, xs] + predicted) & 0xFF
    return out[1:, 1:].astype(np.uint8)


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    estimate = a + b - c
    pa, pb, pc = np.abs(estimate - a), np.abs(estimate - b), np.abs(estimate - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def _png16_bytes(pixels: np.ndarray) -> bytes:
    """uint16 (H, W, C), C in 1..4 -> a 16-bit PNG (rows unfiltered, zlib at PNG_COMPRESS_LEVEL)."""
    height, width, channels = pixels.shape
    color_type = {1: 0, 3: 2, 2: 4, 4: 6}[channels]
    rows = pixels.astype(">u2").reshape(height, width * channels).view(np.uint8)
    raw = np.hstack([np.zeros((height, 1), np.uint8), rows]).tobytes()  # filter byte 0 (None) per row
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    body = _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw, PNG_COMPRESS_LEVEL))
    return _PNG_SIGNATURE + body + _png_chunk(b"IEND", b"")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
