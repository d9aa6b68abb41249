"""Tiled inference with bounded memory: the encoder and the generator both run tile by tile.

The model is split at its codes (`TileModel`): `encode_tile` turns an LR crop into its IDR and its
spatial code `xk`, `reconstruct_tile` turns an LR tile, the image's mean IDR and the tile's `xk`
into the SR tile. The student implements it, and so do the ONNX runner (`workflows.onnx_model`) and
the reduced-precision wrapper (`lightbsr.precision`).

Two passes over the image:

1. The channel code `ca` is a function of the mean of the whole image's IDR. The encoder runs on
   crops of at most `tile` pixels plus a halo that covers its receptive field (six 3x3 convs, strides
   1,1,2,1,2,1: 12 LR pixels before a cell, 8 after), with crop origins on the stride-4 grid; each
   crop contributes only the IDR cells that lie wholly inside it, so the summed cells, and the mean,
   equal the untiled ones (eval-mode BatchNorm is per pixel; zero padding only at true image edges).
2. For each generator tile, the encoder runs again on the tile plus that halo (and one more pixel for
   the spatial code's 3x3 conv), which gives exactly the untiled `xk` over the tile; the generator
   then runs on the tile with the shared codes. Recomputing the encoder (about 1% of the default
   student's work, 5% of a one-group one-block student's) keeps its 32-channel full-resolution
   activations, the IDR and `xk` at tile size instead of image size.

The codes are therefore exact. The SR tiles are not: each adaptation block's channel branch pools
its own tile's features, and the per-group code refinement pads `xk` with zeros at tile edges, so
neighbouring tiles overlap by at least `overlap` LR pixels and are blended with linear ramps across
the overlap. The ramps are normalised per axis (a grid of tiles has separable weight sums), so the
output is accumulated tile by tile into one preallocated SR tensor without a weight buffer.

What stays O(image): the LR input and the float SR output (3 channels at HR size) that
`upscale_tiled` returns. Everything else is O(tile): encoder activations on one crop, the
generator's activations (64 channels up to HR tile size) and one weighted SR tile.

`shared_codes=False` runs the whole model on each tile instead (each tile then sees its own
channel code and its own zero-padded spatial code); it exists to show what sharing the codes buys.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch

from lightbsr.encoder import ENCODER_STAGES
from lightbsr.validation import check_image_batch

__all__ = [
    "DEFAULT_OVERLAP",
    "DEFAULT_TILE",
    "ENCODER_STRIDE",
    "MIN_SIDE",
    "TileModel",
    "blend_ramp",
    "encoder_window",
    "idr_mean_tiled",
    "lr_device",
    "spatial_code_tiled",
    "tile_starts",
    "to_uint8",
    "upscale",
    "upscale_tiled",
]

DEFAULT_TILE = 192  # LR pixels per tile side (HR 768 at x4)
DEFAULT_OVERLAP = 32  # LR pixels shared by neighbouring tiles
MIN_SIDE = 4  # smallest LR side: one cell of the IDR, which works at 1/4 resolution
ENCODER_STRIDE = math.prod(stride for _, stride in ENCODER_STAGES)  # LR pixels per IDR cell (4)


@runtime_checkable
class TileModel(Protocol):
    """What tiled inference needs from a model: LightBSR split at its codes.

    Tensors are float (B, C, H, W) on the model's device; the SR is not clamped.
    """

    scale: int

    def encode_tile(self, lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LR crop (B, 3, h, w) -> (IDR (B, 128, ceil(h/4), ceil(w/4)), xk (B, 8, h, w)), computed as if the
        crop were a whole image (zero padding at its edges)."""
        ...

    def reconstruct_tile(self, lr: torch.Tensor, idr_mean: torch.Tensor, xk: torch.Tensor) -> torch.Tensor:
        """LR tile (B, 3, h, w), the whole image's mean IDR (B, 128) and the tile's xk (B, 8, h, w)
        -> SR tile (B, 3, s*h, s*w)."""
        ...


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


def encoder_window(first: int, stop: int, length: int) -> tuple[int, int]:
    """LR pixels [start, end) of one axis whose encoding holds IDR cells [first, stop) exactly.

    Walks the receptive field back through the encoder's 3x3 convs (padding 1), then moves the start
    down onto the stride grid so the crop's strided convs sample the same pixels as the whole image's.
    """
    low, high = first, stop - 1  # inclusive
    for _, stride in reversed(ENCODER_STAGES):
        low, high = stride * low - 1, stride * high + 1
    return max(0, low // ENCODER_STRIDE * ENCODER_STRIDE), min(length, high + 1)


def _cell_windows(length: int, tile: int) -> list[tuple[int, int]]:
    """IDR cells of one axis in runs of at most tile / 4 cells."""
    cells = math.ceil(length / ENCODER_STRIDE)
    step = max(1, tile // ENCODER_STRIDE)
    return [(first, min(first + step, cells)) for first in range(0, cells, step)]


def idr_mean_tiled(model: TileModel, lr: torch.Tensor, tile: int = DEFAULT_TILE) -> torch.Tensor:
    """The mean of the whole image's IDR (B, 128), from encoder crops of at most `tile` pixels plus the halo."""
    height, width = lr.shape[-2:]
    total: torch.Tensor | None = None
    for first_y, stop_y in _cell_windows(height, tile):
        y0, y1 = encoder_window(first_y, stop_y, height)
        for first_x, stop_x in _cell_windows(width, tile):
            x0, x1 = encoder_window(first_x, stop_x, width)
            idr, _ = model.encode_tile(lr[..., y0:y1, x0:x1])
            cy, cx = y0 // ENCODER_STRIDE, x0 // ENCODER_STRIDE
            cells = idr[..., first_y - cy : stop_y - cy, first_x - cx : stop_x - cx]
            part = cells.sum(dim=(2, 3), dtype=torch.float64)
            total = part if total is None else total + part
    assert total is not None
    count = math.ceil(height / ENCODER_STRIDE) * math.ceil(width / ENCODER_STRIDE)
    return (total / count).to(lr.dtype)


def _code_window(start: int, stop: int, length: int) -> tuple[int, int]:
    """LR pixels of one axis to encode for the exact xk over pixels [start, stop): xk's 3x3 conv reads one
    pixel beyond, which comes from IDR cells (start - 1) // 4 ... stop // 4."""
    first = max(start - 1, 0) // ENCODER_STRIDE
    stop_cell = min(stop, length - 1) // ENCODER_STRIDE + 1
    return encoder_window(first, stop_cell, length)


def spatial_code_tiled(
    model: TileModel, lr: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int]
) -> torch.Tensor:
    """The whole image's spatial code xk over LR rows x cols, from one encoder crop around them."""
    height, width = lr.shape[-2:]
    (y0, y1), (x0, x1) = _code_window(*rows, height), _code_window(*cols, width)
    _, xk = model.encode_tile(lr[..., y0:y1, x0:x1])
    return xk[..., rows[0] - y0 : rows[1] - y0, cols[0] - x0 : cols[1] - x0]


def _axis_weights(starts: list[int], tile: int, length: int, scale: int, device: torch.device) -> list[torch.Tensor]:
    """Each window's HR blending ramp divided by the ramps' sum over the axis.

    Tiles form a grid, so the 2-D weight sum is the product of the axes' sums: the outer product of
    two normalised ramps is the tile's final weight, and the output needs no division at the end.
    """
    ends = [min(start + tile, length) for start in starts]
    before = [0] + [ends[i - 1] - starts[i] for i in range(1, len(starts))]
    after = [*before[1:], 0]
    ramps = [
        blend_ramp((end - start) * scale, left * scale, right * scale, device)
        for start, end, left, right in zip(starts, ends, before, after)
    ]
    total = torch.zeros(length * scale, device=device)
    for start, ramp in zip(starts, ramps):
        total[start * scale : start * scale + ramp.numel()] += ramp
    return [ramp / total[start * scale : start * scale + ramp.numel()] for start, ramp in zip(starts, ramps)]


def _check_tiling(model: object, lr: torch.Tensor, tile: int, overlap: int) -> None:
    if not isinstance(model, TileModel):  # tiling needs the model split at its codes
        raise TypeError(f"model: expected a lightbsr TileModel (a Student, say), got {type(model).__name__}")
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
    model: TileModel,
    lr: torch.Tensor,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    shared_codes: bool = True,
) -> torch.Tensor:
    """LR (B, 3, H, W) in [0, 1] -> SR (B, 3, sH, sW), float (not clamped), computed tile by tile.

    An image no larger than one tile runs in one piece and equals the untiled model.
    """
    _check_tiling(model, lr, tile, overlap)
    height, width = lr.shape[-2:]
    if height <= tile and width <= tile:
        idr, xk = model.encode_tile(lr)
        return model.reconstruct_tile(lr, idr.mean(dim=(2, 3)), xk)
    scale = model.scale
    idr_mean = idr_mean_tiled(model, lr, tile) if shared_codes else None
    ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    wys = _axis_weights(ys, tile, height, scale, lr.device)
    wxs = _axis_weights(xs, tile, width, scale, lr.device)
    out = lr.new_zeros(lr.shape[0], 3, height * scale, width * scale)
    for y0, wy in zip(ys, wys):
        y1 = min(y0 + tile, height)
        for x0, wx in zip(xs, wxs):
            x1 = min(x0 + tile, width)
            piece = lr[..., y0:y1, x0:x1]
            if idr_mean is not None:
                sr = model.reconstruct_tile(piece, idr_mean, spatial_code_tiled(model, lr, (y0, y1), (x0, x1)))
            else:
                idr, xk = model.encode_tile(piece)
                sr = model.reconstruct_tile(piece, idr.mean(dim=(2, 3)), xk)
            weight = (wy[:, None] * wx[None, :])[None, None]  # (1, 1, th*s, tw*s)
            out[..., y0 * scale : y1 * scale, x0 * scale : x1 * scale].addcmul_(sr, weight)
    return out


def upscale(
    model: TileModel, image: torch.Tensor, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP
) -> torch.Tensor:
    """uint8 (H, W, 3) image -> uint8 (sH, sW, 3) upscaled image, tiled, on `lr_device(model)`."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[-1] != 3:
        raise ValueError(f"image: expected a uint8 (H, W, 3) tensor, got {image.dtype} {tuple(image.shape)}")
    lr = image.to(lr_device(model)).permute(2, 0, 1)[None].float() / 255  # (H, W, 3) -> (1, 3, H, W)
    sr = upscale_tiled(model, lr, tile, overlap)
    del lr
    sr = sr.clamp_(0, 1).mul_(255).round_()  # in place: the float SR is the one image-sized float buffer
    return sr.to(torch.uint8)[0].permute(1, 2, 0).cpu()  # -> (sH, sW, 3)


def lr_device(model: object) -> torch.device:
    """Where the model wants its inputs: its parameters' device, else its `device` attribute, else the CPU."""
    if isinstance(model, torch.nn.Module):
        first = next(model.parameters(), None)
        if first is not None:
            return first.device
    return torch.device(getattr(model, "device", "cpu"))


def to_uint8(sr: torch.Tensor) -> torch.Tensor:
    """Float SR in [0, 1] (unclamped) -> uint8 on 8-bit levels, rounding half to even like torch.round."""
    return (sr.clamp(0, 1) * 255).round().to(torch.uint8)
