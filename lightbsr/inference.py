"""One image through the model: file bytes -> `Picture` -> tiled SR -> `Picture` -> file bytes.

The one per-image path: `lightbsr upscale`, the batch actors, the Serve deployment and the pyfunc
all call `upscale_bytes` (or `upscale_picture` when they hold decoded pictures), so gray, alpha,
palette, 16-bit, CMYK and EXIF-rotated inputs are treated alike everywhere. The model sees float
RGB only; alpha is upscaled apart (bicubic), gray is written back as luma, 16-bit stays 16-bit.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from lightbsr.images import ImageError, Picture, decode_picture, encode_picture
from lightbsr.tiling import DEFAULT_OVERLAP, DEFAULT_TILE, MIN_SIDE, TileModel, upscale_tiled

__all__ = ["OUTPUT_FORMATS", "output_format", "upscale_bytes", "upscale_picture"]

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


def upscale_picture(
    model: TileModel, picture: Picture, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP
) -> Picture:
    """The upscaled picture: RGB through the tiled model (`lightbsr.tiling.upscale_tiled`, on the model's
    device), clamped to [0, 1]; alpha by Pillow's bicubic (a = -0.5) in float; gray, bits and format kept."""
    lr = torch.from_numpy(picture.rgb).permute(2, 0, 1)[None].to(_device(model))  # (1, 3, H, W)
    sr = upscale_tiled(model, lr, tile, overlap).clamp(0, 1)  # (1, 3, sH, sW)
    rgb = np.ascontiguousarray(sr[0].permute(1, 2, 0).float().cpu().numpy())
    alpha = None if picture.alpha is None else _resize(picture.alpha, rgb.shape[1], rgb.shape[0])
    return Picture(rgb, alpha, picture.gray, picture.bits, picture.format)


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
    return encode_picture(upscale_picture(model, picture, tile, overlap), chosen), chosen
