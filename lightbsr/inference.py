"""One image through the model: file bytes -> `Picture` -> tiled SR, band by band -> integer levels -> file bytes.

The one per-image path: `lightbsr upscale`, the batch actors, the Serve deployment and the pyfunc
all call `upscale_bytes` (or `upscale_pixels` when they hold decoded pictures), so gray, alpha,
palette, 16-bit, CMYK and EXIF-rotated inputs are treated alike everywhere. The model sees float
RGB only; alpha is upscaled apart (bicubic), gray is written back as luma, 16-bit stays 16-bit.
The SR is quantised into the output's uint8 / uint16 array band by band as the tiles finish, so the
only image-sized buffers are the float LR, that array (and a float alpha for alpha inputs) and the
encoder's copies of it.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from lightbsr.images import ImageError, Picture, decode_picture, encode_pixels, quantise, write_color
from lightbsr.tiling import DEFAULT_OVERLAP, DEFAULT_TILE, MIN_SIDE, TileModel, upscale_bands

__all__ = ["OUTPUT_FORMATS", "output_format", "upscale_bytes", "upscale_pixels"]

OUTPUT_FORMATS = ("PNG", "JPEG", "WEBP")


def output_format(picture: Picture, name: str, requested: str | None = None) -> str:
    """The format to write `picture` in: `requested`, else the source's when it is PNG, JPEG or WebP, else PNG.

    The default always holds the picture (a JPEG source has neither alpha nor 16 bits; WebP holds
    8-bit alpha). A requested format that would lose something (16 bits in anything but PNG, alpha
    in JPEG) is an `ImageError` naming the file, rather than a silent loss.
    """
    if requested is None:
        return picture.format if picture.format in OUTPUT_FORMATS else "PNG"
    fmt = {"JPG": "JPEG"}.get(requested.upper(), requested.upper())
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"format: expected one of {', '.join(OUTPUT_FORMATS)}, got {requested!r}")
    if picture.bits == 16 and fmt != "PNG":
        raise ImageError(name, "format", f"16 bits per channel cannot be written as {fmt} without loss; use PNG")
    if picture.alpha is not None and fmt == "JPEG":
        raise ImageError(name, "format", "JPEG cannot hold its alpha channel; use PNG or WEBP")
    return fmt


def _device(model: TileModel) -> torch.device:
    """A torch model's device; models that are not torch modules (an ONNX runner) take CPU tensors."""
    parameter = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    return parameter.device if parameter is not None else torch.device("cpu")


def upscale_pixels(
    model: TileModel, picture: Picture, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP
) -> np.ndarray:
    """The upscaled picture as the integer levels `encode_pixels` writes (uint8, or uint16 at 16 bits;
    (sH, sW, C), C = 1 gray, 2 gray + alpha, 3 RGB, 4 RGBA).

    RGB goes through the tiled model (`lightbsr.tiling.upscale_bands`, on the model's device) and each
    finished band is clamped to [0, 1] and quantised into the one integer array (gray as its luma), so
    the float SR never exists at full size; alpha is upscaled by Pillow's bicubic (a = -0.5) in float.
    The levels equal `picture_pixels` of the whole float SR.
    """
    height, width = picture.rgb.shape[0] * model.scale, picture.rgb.shape[1] * model.scale
    alpha = None if picture.alpha is None else _resize(picture.alpha, width, height)
    channels = (1 if picture.gray else 3) + (alpha is not None)
    pixels = np.empty((height, width, channels), np.uint16 if picture.bits == 16 else np.uint8)
    lr = torch.from_numpy(picture.rgb).permute(2, 0, 1)[None].to(_device(model))  # (1, 3, H, W)
    for row, band in upscale_bands(model, lr, tile, overlap):
        rgb = np.ascontiguousarray(band.clamp(0, 1)[0].permute(1, 2, 0).float().cpu().numpy())  # (rows, sW, 3)
        rows = pixels[row : row + rgb.shape[0]]
        write_color(rows, rgb, picture.gray)
        if alpha is not None:
            rows[..., -1] = quantise(alpha[row : row + rgb.shape[0]], pixels.dtype.type)
    return pixels


def _resize(channel: np.ndarray, width: int, height: int) -> np.ndarray:
    """float32 (H, W) in [0, 1] -> (height, width) by Pillow's bicubic, one axis at a time, clamped to [0, 1]
    after each (as Pillow does on 8-bit images, so hard alpha edges do not ring through both passes)."""
    image = Image.fromarray(np.ascontiguousarray(channel, np.float32))
    rows = np.clip(np.asarray(image.resize((width, channel.shape[0]), Image.Resampling.BICUBIC)), 0, 1)
    both = Image.fromarray(rows).resize((width, height), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(both, np.float32), 0, 1)


def upscale_bytes(
    model: TileModel,
    data: bytes,
    name: str,
    fmt: str | None = None,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    max_pixels: int | None = None,
) -> tuple[bytes, str]:
    """Image file bytes -> (upscaled file bytes, their format: PNG, JPEG or WEBP).

    `name` labels errors (`ImageError` for a bad input or a `fmt` that cannot hold it); `fmt`
    None keeps the source's format (`output_format`); `max_pixels` defaults to Pillow's limit.
    """
    picture = decode_picture(data, name, max_pixels=max_pixels, min_size=MIN_SIDE)
    chosen = output_format(picture, name, fmt)
    pixels = upscale_pixels(model, picture, tile, overlap)
    del picture  # its float LR is not needed to encode
    return encode_pixels(pixels, chosen), chosen
