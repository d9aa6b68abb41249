"""Tiled inference: an exact tiled encoder, shared whole-image codes, tiles that agree with the untiled output."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lightbsr.images import read_rgb
from lightbsr.student import Student
from lightbsr.tiling import (
    DEFAULT_OVERLAP,
    DEFAULT_TILE,
    TileModel,
    blend_ramp,
    idr_mean_tiled,
    spatial_code_tiled,
    tile_starts,
    upscale,
    upscale_bands,
    upscale_tiled,
)

pytestmark = pytest.mark.unit

CODE_GAIN = 10.0  # a trained student's codes steer the output; default-initialised codes barely do


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


def code_driven_student(lr: torch.Tensor, seed: int = 0) -> Student:
    """A small x4 student with random but fixed weights whose output depends on the channel code.

    Layer scales, BatchNorm statistics and the code pathways are randomised/amplified, and the
    output layer is rescaled so the SR image has a photograph-like spread (std ~0.25) on `lr`.
    """
    torch.manual_seed(seed)
    student = Student(scale=4, n_groups=2, n_blocks=2).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.3 + 0.1)
        for name, b in student.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.1 + 0.05)
        student.generator.converter.channel_code.weight.mul_(CODE_GAIN)
        for group in student.generator.groups:
            for block in group.blocks:
                block.channel.mlp[0].weight[:, -48:].mul_(CODE_GAIN)
        student.generator.to_rgb.weight.mul_(0.25 / student(lr).std())
    return student


@pytest.fixture(scope="module")
def wide_lr(sample_images) -> torch.Tensor:
    """Real photographs side by side, 64 x 320 LR: smooth sky beside fine texture (the tiles see
    different content, as in a panorama), wider than one default tile, small enough to run untiled."""
    sky = read_rgb(sample_images / "eval" / "sail.png")[0:64, 0:160]
    texture = read_rgb(sample_images / "eval" / "barbara.png")[300:364, 400:560]
    pixels = np.concatenate([sky, texture], axis=1)
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None].float() / 255


@pytest.fixture(scope="module")
def outputs(wide_lr):
    student = code_driven_student(wide_lr)
    with torch.no_grad():
        whole = student(wide_lr).clamp(0, 1)
    shared = upscale_tiled(student, wide_lr).clamp(0, 1)
    separate = upscale_tiled(student, wide_lr, shared_codes=False).clamp(0, 1)
    return whole, shared, separate


@pytest.mark.parametrize(
    "length,tile,overlap", [(100, 100, 16), (50, 192, 32), (232, 192, 32), (1000, 192, 32), (517, 64, 16)]
)
def test_tile_starts_cover_the_axis_with_at_least_the_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and min(starts[-1] + tile, length) == length
    assert starts == sorted(set(starts))
    for a, b in itertools.pairwise(starts):
        assert a + tile - b >= overlap  # neighbours share at least `overlap` pixels
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()


def test_blend_ramp_only_fades_edges_that_have_a_neighbour():
    w = blend_ramp(20, 8, 0)
    assert torch.all(w > 0) and torch.all(w[8:] == 1)
    assert torch.all(w[1:8] > w[:7])  # rising across the shared pixels
    assert torch.equal(blend_ramp(20, 0, 0), torch.ones(20))
    both = blend_ramp(20, 6, 4)
    assert torch.allclose(both[:6] + blend_ramp(20, 0, 6)[-6:], torch.ones(6))  # neighbours sum to one


def test_tiled_output_matches_untiled_at_default_tile_and_overlap(outputs, wide_lr, record_property):
    whole, shared, _ = outputs
    assert wide_lr.shape[-1] > DEFAULT_TILE  # the default tiling really cuts this image
    quality = psnr_db(shared, whole)
    # the seams: HR columns where the second tile starts and where the first one ends
    starts = tile_starts(wide_lr.shape[-1], DEFAULT_TILE, DEFAULT_OVERLAP)
    seam_cols = [4 * starts[1], 4 * min(starts[0] + DEFAULT_TILE, wide_lr.shape[-1]) - 1]
    seam_diff = float((shared - whole)[..., seam_cols].abs().max() * 255)
    record_property("tiled_vs_untiled_psnr_db", round(quality, 2))
    record_property("largest_seam_difference_levels", round(seam_diff, 3))
    print(f"tiled vs untiled: {quality:.2f} dB, largest seam difference {seam_diff:.3f} / 255")
    assert quality >= 50.0
    assert seam_diff < 2.0  # under one 8-bit level either way of rounding


def test_tiling_without_shared_codes_does_worse(outputs, record_property):
    whole, shared, separate = outputs
    with_codes, without = psnr_db(shared, whole), psnr_db(separate, whole)
    record_property("untiled_vs_per_tile_codes_psnr_db", round(without, 2))
    print(f"shared codes {with_codes:.2f} dB, per-tile codes {without:.2f} dB")
    assert without < with_codes - 3.0


def varied_student(scale: int = 4, seed: int = 0) -> Student:
    """A one-group one-block student with randomised BatchNorm statistics (default ones are the identity,
    which would hide a wrongly placed normalisation)."""
    torch.manual_seed(seed)
    student = Student(scale=scale, n_groups=1, n_blocks=1).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in student.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.1 + 0.05)
    return student


@pytest.mark.parametrize("height,width,tile", [(37, 53, 16), (61, 70, 24), (64, 64, 20), (23, 41, 8), (50, 30, 192)])
def test_tiled_encoder_gives_the_untiled_codes(height, width, tile):
    """The channel code from encoder crops of `tile` pixels (plus the halo) and the spatial code of each tile
    equal the whole image's, sides that are not multiples of 4 included."""
    student = varied_student()
    lr = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(height))
    with torch.no_grad():
        idr = student.encode(lr)
        ca, xk = student.generator.convert(idr, (height, width))
        ca_tiled = student.generator.converter.channel_code_of(idr_mean_tiled(student, lr, tile))
        torch.testing.assert_close(ca_tiled, ca, rtol=0, atol=1e-5)
        for y0 in range(0, height, tile):
            for x0 in range(0, width, tile):
                rows, cols = (y0, min(y0 + tile, height)), (x0, min(x0 + tile, width))
                xk_tile = spatial_code_tiled(student, lr, rows, cols)
                torch.testing.assert_close(xk_tile, xk[..., slice(*rows), slice(*cols)], rtol=0, atol=1e-5)
    assert xk.abs().max() > 1.0  # codes of a size where 1e-5 is a tight bound


def test_tiles_without_overlap_are_the_generator_on_each_crop_with_the_whole_images_codes():
    """overlap 0: no blending, so each output block must be the generator run on that LR crop with the
    whole image's channel code and the matching crop of its spatial code (tiles placed by hand: a 56x84
    image in tiles of 28 -> 2 x 3 blocks)."""
    student = varied_student(scale=3, seed=1)
    lr = torch.rand(1, 3, 56, 84, generator=torch.Generator().manual_seed(1))
    tiled = upscale_tiled(student, lr, tile=28, overlap=0)
    with torch.no_grad():
        ca, xk = student.generator.convert(student.encode(lr), (56, 84))
        for y0, y1 in ((0, 28), (28, 56)):
            for x0, x1 in ((0, 28), (28, 56), (56, 84)):
                block = student.generator.reconstruct(lr[..., y0:y1, x0:x1], ca, xk[..., y0:y1, x0:x1])
                torch.testing.assert_close(tiled[..., 3 * y0 : 3 * y1, 3 * x0 : 3 * x1], block, rtol=0, atol=1e-5)
        assert (tiled - student(lr)).abs().max() > 1e-3  # the crops really differ from the whole image at the seams


def test_an_image_that_fits_one_tile_equals_the_untiled_student():
    """Where it fits, the output is the untiled one; beyond one tile it cannot be (each adaptation block's
    channel branch pools its own tile), which the PSNR tests above bound."""
    student = varied_student(seed=2)
    lr = torch.rand(1, 3, 45, 38, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(upscale_tiled(student, lr, tile=48, overlap=8), student(lr), rtol=0, atol=1e-5)


def test_small_tiles_cover_an_odd_image_exactly_once_in_shape():
    student = Student(scale=2, n_groups=1, n_blocks=1).eval()
    lr = torch.rand(1, 3, 41, 67, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = student(lr)
    tiled = upscale_tiled(student, lr, tile=24, overlap=8)
    assert tiled.shape == whole.shape == (1, 3, 82, 134)
    assert psnr_db(tiled.clamp(0, 1), whole.clamp(0, 1)) > 40.0


def test_encoder_and_generator_never_see_more_than_a_tile_and_its_halo(monkeypatch):
    student = Student(scale=2, n_groups=1, n_blocks=1).eval()
    encoded, reconstructed = [], []
    encode_tile, reconstruct_tile = student.encode_tile, student.reconstruct_tile

    def recording_encode(lr):
        encoded.append(tuple(lr.shape[-2:]))
        return encode_tile(lr)

    def recording_reconstruct(lr, idr_mean, xk):
        reconstructed.append(tuple(lr.shape[-2:]))
        return reconstruct_tile(lr, idr_mean, xk)

    monkeypatch.setattr(student, "encode_tile", recording_encode)
    monkeypatch.setattr(student, "reconstruct_tile", recording_reconstruct)
    out = upscale_tiled(student, torch.rand(1, 3, 70, 100), tile=32, overlap=8)
    assert out.shape == (1, 3, 140, 200)
    assert len(reconstructed) == 3 * 4 and all(h <= 32 and w <= 32 for h, w in reconstructed)
    # xk's 3x3 conv reads the cell of the pixel before and after the tile; each cell needs 11 LR pixels either
    # side, the crop starting on the stride-4 grid: at most 16 pixels before the tile and 12 after
    halo = 16 + 12
    assert max(max(h, w) for h, w in encoded) <= 32 + halo
    assert isinstance(student, TileModel)


def test_uint8_upscale_returns_an_image_of_scaled_size():
    student = Student(scale=2, n_groups=1, n_blocks=1).eval()
    image = torch.randint(0, 256, (9, 13, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    out = upscale(student, image)
    with torch.no_grad():
        direct = (student(image.permute(2, 0, 1)[None].float() / 255).clamp(0, 1) * 255).round().to(torch.uint8)
    assert out.dtype == torch.uint8 and out.shape == (18, 26, 3)
    assert torch.equal(out, direct[0].permute(1, 2, 0))


@pytest.mark.parametrize("size", [(1, 1), (3, 40)])
def test_too_small_images_are_rejected_with_their_size(size):
    student = Student(scale=2, n_groups=1, n_blocks=1).eval()
    with pytest.raises(ValueError, match=f"{size[1]}x{size[0]} pixels"):
        upscale_tiled(student, torch.rand(1, 3, *size))


def test_a_model_that_is_not_a_tile_model_is_refused_with_its_type():
    with pytest.raises(TypeError, match="got Conv2d"):
        upscale_tiled(torch.nn.Conv2d(3, 3, 3), torch.rand(1, 3, 300, 300))


def ramp(starts: list[int], i: int, tile: int, length: int) -> torch.Tensor:
    """Window i's x2 HR ramp across what it shares with the windows before and after it."""
    end = min(starts[i] + tile, length)
    left = min(starts[i - 1] + tile, length) - starts[i] if i > 0 else 0
    right = end - starts[i + 1] if i + 1 < len(starts) else 0
    return blend_ramp(2 * (end - starts[i]), 2 * left, 2 * right)


def test_bands_are_final_when_handed_on_and_equal_blending_every_tile_at_once(sample_images):
    """The bands, copied as they come, against the plain way of blending: every weighted tile and every
    weight summed over the whole image, divided at the end. A band handed on before the next tile row
    blended into it would miss that row's share."""
    student = Student(scale=2, n_groups=1, n_blocks=1).eval()
    lr = torch.from_numpy(read_rgb(sample_images / "eval" / "tulips.png")[40:90, 30:100]).permute(2, 0, 1)[None]
    lr = lr.float() / 255
    tile, overlap = 20, 6
    bands = [(row, band.clone()) for row, band in upscale_bands(student, lr, tile, overlap)]
    with torch.no_grad():
        idr_mean = idr_mean_tiled(student, lr, tile)
        total, weights = torch.zeros(1, 3, 100, 140), torch.zeros(1, 1, 100, 140)
        ys, xs = tile_starts(50, tile, overlap), tile_starts(70, tile, overlap)
        for (i, y0), (j, x0) in itertools.product(enumerate(ys), enumerate(xs)):
            y1, x1 = min(y0 + tile, 50), min(x0 + tile, 70)
            xk = spatial_code_tiled(student, lr, (y0, y1), (x0, x1))
            sr = student.reconstruct_tile(lr[..., y0:y1, x0:x1], idr_mean, xk)
            weight = (ramp(ys, i, tile, 50)[:, None] * ramp(xs, j, tile, 70)[None, :])[None, None]
            total[..., 2 * y0 : 2 * y1, 2 * x0 : 2 * x1] += sr * weight
            weights[..., 2 * y0 : 2 * y1, 2 * x0 : 2 * x1] += weight
    assert len(ys) == 4 and [row for row, _ in bands] == [2 * y0 for y0 in ys]  # one band per tile row
    assert sum(band.shape[2] for _, band in bands) == 100
    torch.testing.assert_close(torch.cat([band for _, band in bands], dim=2), total / weights, rtol=0, atol=1e-5)
