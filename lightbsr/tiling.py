"""Tiled inference: the generator runs tile by tile, the codes come from the whole image.

The channel code `ca` is a global average over the whole image's IDR, so the encoder and the
IDR converter run once on the whole LR image and every tile of the generator gets the same `ca`
and its own crop of the spatial code `xk`. Only the generator, whose 64-channel activations (at
LR size in its groups, up to HR size in its upsampler) dominate an untiled run, is tiled.

Memory is therefore NOT bounded: it still grows with the image's area, through the encoder's
first stages (32 channels at full LR resolution), `xk` (8 channels at LR size) and the SR output
with its blending weights (4 channels at HR size); a tile caps only the generator's share.

Neighbouring tiles overlap by at least `overlap` LR pixels and are blended with linear ramps
across the overlap, which hides the small differences between tiles (each block's channel
branch pools its own tile).

`shared_codes=False` runs the whole student on each tile instead (each tile then sees its own
channel code); it exists to show what sharing the codes buys.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lightbsr.student import Student
from lightbsr.validation import check_image_batch

__all__ = [
    "DEFAULT_OVERLAP",
    "DEFAULT_TILE",
    "MIN_SIDE",
    "blend_ramp",
    "tile_starts",
    "to_uint8",
    "upscale",
    "upscale_tiled",
]

DEFAULT_TILE = 192  # LR pixels per tile side (HR 768 at x4)
DEFAULT_OVERLAP = 32  # LR pixels shared by neighbouring tiles
MIN_SIDE = 4  # smallest LR side: one cell of the IDR, which works at 1/4 resolution


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of windows of `tile` pixels covering [0, length), neighbours sharing >= `overlap`."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))  # fewest windows that keep the overlap
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]  # spread evenly


def blend_ramp(size: int, left: int, right: int, device: torch.device | None = None) -> torch.Tensor:
    """1-D blending weights of one window: linear ramps across the `left` / `right` pixels it shares
    with its neighbours (0 = no neighbour on that side).

    Weights stay above zero, so every pixel is covered; the caller divides by the summed weights.
    """
    weight = torch.ones(size, device=device)
    if left:
        weight[:left] = torch.minimum(weight[:left], _rise(left, device))
    if right:
        weight[size - right :] = torch.minimum(weight[size - right :], _rise(right, device).flip(0))
    return weight


def _rise(length: int, device: torch.device | None) -> torch.Tensor:
    """(0.5 .. length - 0.5) / length: a linear ramp from near 0 to near 1."""
    return (torch.arange(length, device=device, dtype=torch.float32) + 0.5) / length


def _shared(starts: list[int], tile: int, length: int) -> list[tuple[int, int]]:
    """(pixels shared with the previous window, with the next window) for each window of an axis."""
    ends = [min(start + tile, length) for start in starts]
    before = [0] + [ends[i - 1] - starts[i] for i in range(1, len(starts))]
    return list(zip(before, [*before[1:], 0]))


def _check_tiling(lr: torch.Tensor, tile: int, overlap: int) -> None:
    check_image_batch(lr, "lr")
    height, width = lr.shape[-2:]
    if min(height, width) < MIN_SIDE:
        raise ValueError(f"lr: image of {width}x{height} pixels is smaller than the minimum side of {MIN_SIDE} pixels")
    if tile < MIN_SIDE:
        raise ValueError(f"tile: expected at least {MIN_SIDE} pixels, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap: expected 0 <= overlap < tile ({tile}), got {overlap}")


@torch.no_grad()
def upscale_tiled(
    student: nn.Module,
    lr: torch.Tensor,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    shared_codes: bool = True,
) -> torch.Tensor:
    """LR (B, 3, H, W) in [0, 1] -> SR (B, 3, sH, sW), float (not clamped), computed tile by tile.

    An image no larger than one tile runs in one piece and equals `student(lr)`.
    """
    if not isinstance(student, Student):  # tiling needs the student's own encoder and generator
        raise TypeError(f"student: expected a lightbsr Student, got {type(student).__name__}")
    _check_tiling(lr, tile, overlap)
    height, width = lr.shape[-2:]
    if height <= tile and width <= tile:
        return student(lr)
    scale = student.scale
    generator = student.generator
    if shared_codes:
        ca, xk = generator.convert(student.encode(lr), (height, width))  # (B, 48), (B, 8, H, W)
    ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    y_shared, x_shared = _shared(ys, tile, height), _shared(xs, tile, width)
    out = lr.new_zeros(lr.shape[0], 3, height * scale, width * scale)
    total = lr.new_zeros(1, 1, height * scale, width * scale)
    for y0, (top, bottom) in zip(ys, y_shared):
        y1 = min(y0 + tile, height)
        wy = blend_ramp((y1 - y0) * scale, top * scale, bottom * scale, lr.device)
        for x0, (left, right) in zip(xs, x_shared):
            x1 = min(x0 + tile, width)
            piece = lr[..., y0:y1, x0:x1]
            if shared_codes:
                sr = generator.reconstruct(piece, ca, xk[..., y0:y1, x0:x1])
            else:
                sr = student(piece)
            wx = blend_ramp((x1 - x0) * scale, left * scale, right * scale, lr.device)
            weight = (wy[:, None] * wx[None, :])[None, None]  # (1, 1, th*s, tw*s)
            region = (..., slice(y0 * scale, y1 * scale), slice(x0 * scale, x1 * scale))
            out[region] += sr * weight
            total[region] += weight
    return out / total


def upscale(
    student: nn.Module, image: torch.Tensor, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP
) -> torch.Tensor:
    """uint8 (H, W, 3) image -> uint8 (sH, sW, 3) upscaled image, tiled, on the student's device."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[-1] != 3:
        raise ValueError(f"image: expected a uint8 (H, W, 3) tensor, got {image.dtype} {tuple(image.shape)}")
    device = next(student.parameters()).device
    lr = image.to(device).permute(2, 0, 1)[None].float() / 255  # (H, W, 3) -> (1, 3, H, W)
    sr = upscale_tiled(student, lr, tile, overlap)
    return to_uint8(sr)[0].permute(1, 2, 0).cpu()  # -> (sH, sW, 3)


def to_uint8(sr: torch.Tensor) -> torch.Tensor:
    """Float SR in [0, 1] (unclamped) -> uint8 on 8-bit levels, rounding half to even like torch.round."""
    return (sr.clamp(0, 1) * 255).round().to(torch.uint8)
