"""Tiled inference: shared whole-image codes make tiles agree with the untiled output."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lightbsr.images import read_rgb
from lightbsr.student import Student
from lightbsr.tiling import DEFAULT_OVERLAP, DEFAULT_TILE, blend_ramp, tile_starts, upscale, upscale_tiled

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


def test_tiles_without_overlap_are_the_generator_on_each_crop_with_the_whole_images_codes():
    """overlap 0: no blending, so each output block must be exactly the generator run on that LR crop
    with the whole image's channel code and the matching crop of its spatial code (tiles placed by hand:
    a 56x84 image in tiles of 28 -> 2 x 3 blocks)."""
    student = Student(scale=3, n_groups=1, n_blocks=1).eval()
    lr = torch.rand(1, 3, 56, 84, generator=torch.Generator().manual_seed(1))
    tiled = upscale_tiled(student, lr, tile=28, overlap=0)
    with torch.no_grad():
        ca, xk = student.generator.convert(student.encode(lr), (56, 84))
        for y0, y1 in ((0, 28), (28, 56)):
            for x0, x1 in ((0, 28), (28, 56), (56, 84)):
                block = student.generator.reconstruct(lr[..., y0:y1, x0:x1], ca, xk[..., y0:y1, x0:x1])
                assert torch.equal(tiled[..., 3 * y0 : 3 * y1, 3 * x0 : 3 * x1], block), (y0, x0)
        assert not torch.equal(tiled, student(lr))  # the crops really differ from the whole image at the seams


def test_small_tiles_cover_an_odd_image_exactly_once_in_shape():
    student = Student(scale=2, n_groups=1, n_blocks=1).eval()
    lr = torch.rand(1, 3, 41, 67, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = student(lr)
    tiled = upscale_tiled(student, lr, tile=24, overlap=8)
    assert tiled.shape == whole.shape == (1, 3, 82, 134)
    assert psnr_db(tiled.clamp(0, 1), whole.clamp(0, 1)) > 40.0


def test_generator_never_sees_more_than_one_tile(monkeypatch):
    student = Student(scale=2, n_groups=1, n_blocks=1).eval()
    seen = []
    reconstruct = student.generator.reconstruct

    def recording(lr, ca, xk):
        seen.append(tuple(lr.shape[-2:]))
        return reconstruct(lr, ca, xk)

    monkeypatch.setattr(student.generator, "reconstruct", recording)
    out = upscale_tiled(student, torch.rand(1, 3, 70, 100), tile=32, overlap=8)
    assert out.shape == (1, 3, 140, 200)
    assert len(seen) == 3 * 4 and all(h <= 32 and w <= 32 for h, w in seen)


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


def test_a_model_that_is_not_a_student_is_refused_with_its_type():
    with pytest.raises(TypeError, match="got Conv2d"):
        upscale_tiled(torch.nn.Conv2d(3, 3, 3), torch.rand(1, 3, 300, 300))
