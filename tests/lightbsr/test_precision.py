"""bf16/fp16 inference: agreement with fp32 on the sample photographs, float32 boundaries, NaN/inf fallback."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightbsr.degrade import bicubic_downsample
from lightbsr.images import read_rgb
from lightbsr.metrics import psnr
from lightbsr.precision import NonFiniteFallbackWarning, parse_precision, prepare
from lightbsr.student import Student
from lightbsr.tiling import upscale_tiled

pytestmark = pytest.mark.unit

SCALE = 4
HR_SIZE = 128  # LR 32x32 crops: small, but every layer of the network sees real picture content
TILE, OVERLAP = 20, 8  # 2x2 tiles on a 32x32 LR: the tiled path, shared codes and blending included


def busy_student(seed: int = 0) -> Student:
    """A small x4 student whose blocks all contribute: layer scales 0.05-0.2 as after training
    (a fresh student's 1e-6 layer scales would make every block nearly the identity)."""
    torch.manual_seed(seed)
    student = Student(scale=SCALE, n_groups=2, n_blocks=2).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.05 + 0.15 * torch.rand(p.shape, generator=g))
    return student


@pytest.fixture(scope="module")
def eval_pairs(sample_images) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, LR, HR) per sample eval photograph: a central HR crop and its bicubic x4 LR on 8-bit levels."""
    pairs = []
    for path in sorted((sample_images / "eval").glob("*.png")):
        pixels = read_rgb(path)
        top, left = (pixels.shape[0] - HR_SIZE) // 2, (pixels.shape[1] - HR_SIZE) // 2
        crop = pixels[top : top + HR_SIZE, left : left + HR_SIZE]
        hr = torch.from_numpy(crop.copy()).permute(2, 0, 1)[None].float() / 255
        lr = bicubic_downsample(hr * 255, SCALE).round().clamp(0, 255) / 255
        pairs.append((path.stem, lr, hr))
    assert len(pairs) == 5
    return pairs


@pytest.fixture(scope="module")
def outputs(eval_pairs) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """name -> (fp32 SR, bf16 SR, HR) from one busy student, tiled."""
    student = busy_student()
    fp32, bf16 = prepare(student, "fp32"), prepare(student, "bf16")
    return {
        name: (upscale_tiled(fp32, lr, TILE, OVERLAP), upscale_tiled(bf16, lr, TILE, OVERLAP), hr)
        for name, lr, hr in eval_pairs
    }


def test_bf16_output_is_within_45_db_of_fp32_on_every_sample_photograph(outputs, record_property):
    for name, (ref, low, _) in outputs.items():
        db = float(psnr(low, ref, SCALE, y_channel=False))
        record_property(f"psnr_bf16_vs_fp32_{name}", db)
        assert db >= 45.0, f"{name}: bf16 output only {db:.2f} dB from fp32"


def test_bf16_y_psnr_against_hr_is_within_0_02_db_of_fp32(outputs, record_property):
    for name, (ref, low, hr) in outputs.items():
        gap = float(psnr(low, hr, SCALE) - psnr(ref, hr, SCALE))
        record_property(f"y_psnr_gap_{name}", gap)
        assert abs(gap) <= 0.02, f"{name}: Y-PSNR moved by {gap:+.4f} dB in bf16"


def test_tiling_boundary_is_float32_and_the_codes_come_from_the_fp32_converter(eval_pairs):
    student = busy_student()
    model = prepare(student, "bf16")
    lr = eval_pairs[0][1]
    idr, xk = model.encode_tile(lr)
    sr = model.reconstruct_tile(lr, idr.mean(dim=(2, 3)), xk)
    assert (idr.dtype, xk.dtype, sr.dtype) == (torch.float32,) * 3
    with torch.no_grad():
        want_xk = student.generator.converter.spatial_code_of(idr, (lr.shape[-2], lr.shape[-1]))
    assert torch.equal(xk, want_xk)
    assert model.scale == SCALE and sr.shape[-2:] == (SCALE * lr.shape[-2], SCALE * lr.shape[-1])


def test_fp32_preparation_changes_no_number(eval_pairs):
    student = busy_student()
    lr = eval_pairs[1][1]
    want = upscale_tiled(student, lr, TILE, OVERLAP)
    assert torch.equal(upscale_tiled(prepare(student, "fp32"), lr, TILE, OVERLAP), want)


def test_fp16_overflow_falls_back_to_fp32_with_a_warning(eval_pairs):
    student = busy_student()
    with torch.no_grad():  # features of order 1 times 1e6 overflow fp16 (max 65504), not fp32
        student.generator.upsample[0].weight.mul_(1e6)
    lr = eval_pairs[2][1]
    model = prepare(student, "fp16")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sr = upscale_tiled(model, lr, TILE, OVERLAP)
    assert {w.category for w in caught} == {NonFiniteFallbackWarning}
    assert "generator: fp16 produced NaN or inf" in str(caught[0].message)
    assert model.fallbacks == len(caught) == 4  # one per tile
    assert bool(torch.isfinite(sr).all())
    ref = upscale_tiled(student, lr, TILE, OVERLAP)
    assert float((sr - ref).abs().max() / ref.abs().max()) < 1e-3  # the generator ran in fp32


def test_unknown_precision_is_refused_by_name():
    with pytest.raises(ValueError, match="precision: expected one of fp32, bf16, fp16, got 'fp8'"):
        parse_precision("fp8")
