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
the overlap. The ramps are normalised per axis (a grid of tiles has separable weight sums), so each
tile is accumulated with its final weight and the output needs no weight buffer.

The SR comes out in horizontal bands (`upscale_bands`): one row of tiles is blended into a buffer
of its HR rows; the rows above the next tile row's start are then final and are handed on, and only
the overlap that the next row blends into is carried over. `upscale` and
`lightbsr.inference.upscale_bytes` quantise each band into the integer output as it comes.

What stays O(image): the LR input, and whatever the caller builds from the bands (`upscale_tiled`
returns the whole float SR; `upscale` and `upscale_bytes` only the integer output). Everything else
is O(tile): encoder activations on one crop, the generator's activations (64 channels up to HR tile
size), one weighted SR tile, and at most two rows of tiles at HR size (a tile's height by the image's
width each: the row being blended and the one whose band was handed on last).

`shared_codes=False` runs the whole model on each tile instead (each tile then sees its own
channel code and its own zero-padded spatial code); it exists to show what sharing the codes buys.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import nn

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
    "upscale_bands",
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


def _check_tiling(lr: torch.Tensor, tile: int, overlap: int) -> None:
    check_image_batch(lr, "lr")
    height, width = lr.shape[-2:]
    if min(height, width) < MIN_SIDE:
        raise ValueError(f"lr: image of {width}x{height} pixels is smaller than the minimum side of {MIN_SIDE} pixels")
    if tile < MIN_SIDE:
        raise ValueError(f"tile: expected at least {MIN_SIDE} pixels, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap: expected 0 <= overlap < tile ({tile}), got {overlap}")


def _tile_sr(
    model: TileModel, lr: torch.Tensor, idr_mean: torch.Tensor | None, rows: tuple[int, int], cols: tuple[int, int]
) -> torch.Tensor:
    """The SR of LR rows x cols: with the shared codes, or (`idr_mean` None) with the tile's own."""
    piece = lr[..., rows[0] : rows[1], cols[0] : cols[1]]
    if idr_mean is not None:
        return model.reconstruct_tile(piece, idr_mean, spatial_code_tiled(model, lr, rows, cols))
    idr, xk = model.encode_tile(piece)
    return model.reconstruct_tile(piece, idr.mean(dim=(2, 3)), xk)


def _as_tile_model(model: TileModel | nn.Module) -> TileModel:
    if not isinstance(model, TileModel):  # tiling needs the model split at its codes
        raise TypeError(f"model: expected a lightbsr TileModel (a Student, say), got {type(model).__name__}")
    return model


@torch.no_grad()
def upscale_bands(
    model: TileModel | nn.Module,
    lr: torch.Tensor,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    shared_codes: bool = True,
) -> Iterator[tuple[int, torch.Tensor]]:
    """LR (B, 3, H, W) in [0, 1] -> the SR in finished horizontal bands, top to bottom: (first HR row,
    float band (B, 3, rows, sW), not clamped). The bands tile the SR exactly; together they are
    `upscale_tiled`'s output, number for number.

    Each row of tiles is blended into a buffer of its own HR rows. The rows above the next tile row's
    start are final once the row is done and are yielded; the rest (the overlap the next row blends
    into) is carried over. A band is a view into that row's buffer: copy what you keep.
    """
    model = _as_tile_model(model)
    _check_tiling(lr, tile, overlap)
    height, width = lr.shape[-2:]
    if height <= tile and width <= tile:  # one piece: exactly the untiled model
        idr, xk = model.encode_tile(lr)
        yield 0, model.reconstruct_tile(lr, idr.mean(dim=(2, 3)), xk)
        return
    scale = model.scale
    idr_mean = idr_mean_tiled(model, lr, tile) if shared_codes else None
    ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    wys = _axis_weights(ys, tile, height, scale, lr.device)
    wxs = _axis_weights(xs, tile, width, scale, lr.device)
    carried = lr.new_zeros(lr.shape[0], 3, 0, width * scale)  # HR rows from the row above, still blending
    for index, (y0, wy) in enumerate(zip(ys, wys)):
        y1 = min(y0 + tile, height)
        rows = lr.new_zeros(lr.shape[0], 3, (y1 - y0) * scale, width * scale)
        rows[:, :, : carried.shape[2]] = carried
        for x0, wx in zip(xs, wxs):
            x1 = min(x0 + tile, width)
            weight = (wy[:, None] * wx[None, :])[None, None]  # (1, 1, th*s, tw*s)
            rows[..., x0 * scale : x1 * scale].addcmul_(_tile_sr(model, lr, idr_mean, (y0, y1), (x0, x1)), weight)
        final = ((ys[index + 1] if index + 1 < len(ys) else height) - y0) * scale
        carried = rows[:, :, final:]
        yield y0 * scale, rows[:, :, :final]


@torch.no_grad()
def upscale_tiled(
    model: TileModel | nn.Module,
    lr: torch.Tensor,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    shared_codes: bool = True,
) -> torch.Tensor:
    """LR (B, 3, H, W) in [0, 1] -> SR (B, 3, sH, sW), float (not clamped), computed tile by tile.

    An image no larger than one tile runs in one piece and equals the untiled model. `model` may be
    typed as a plain module (what checkpoints load as); one that is not a `TileModel` is refused.
    The whole SR is held here; `upscale_bands` gives it band by band.
    """
    out: torch.Tensor | None = None
    for row, band in upscale_bands(model, lr, tile, overlap, shared_codes):
        if out is None:  # the bands' dtype and device: the model's output, as the untiled model gives it
            scale = band.shape[3] // lr.shape[-1]
            out = band.new_empty(band.shape[0], 3, lr.shape[-2] * scale, band.shape[3])
        out[:, :, row : row + band.shape[2]] = band
    assert out is not None
    return out


def upscale(
    model: TileModel | nn.Module, image: torch.Tensor, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP
) -> torch.Tensor:
    """uint8 (H, W, 3) image -> uint8 (sH, sW, 3) upscaled image, tiled, on `lr_device(model)`.

    The SR is quantised band by band into the uint8 output, so no image-sized float buffer is made.
    """
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[-1] != 3:
        raise ValueError(f"image: expected a uint8 (H, W, 3) tensor, got {image.dtype} {tuple(image.shape)}")
    model = _as_tile_model(model)
    lr = image.to(lr_device(model)).permute(2, 0, 1)[None].float() / 255  # (H, W, 3) -> (1, 3, H, W)
    height, width = image.shape[:2]
    out = torch.empty(height * model.scale, width * model.scale, 3, dtype=torch.uint8)
    for row, band in upscale_bands(model, lr, tile, overlap):
        sr = band.clamp(0, 1).mul_(255).round_()
        out[row : row + sr.shape[2]] = sr.to(torch.uint8)[0].permute(1, 2, 0).cpu()  # -> (rows, sW, 3)
    return out


def lr_device(model: object) -> torch.device:
    """Where the model wants its inputs: its parameters' device, else its `device` attribute, else the CPU."""
    if isinstance(model, nn.Module):
        first = next(model.parameters(), None)
        if first is not None:
            return first.device
    return torch.device(getattr(model, "device", "cpu"))


def to_uint8(sr: torch.Tensor) -> torch.Tensor:
    """Float SR in [0, 1] (unclamped) -> uint8 on 8-bit levels, rounding half to even like torch.round."""
    return (sr.clamp(0, 1) * 255).round().to(torch.uint8)
