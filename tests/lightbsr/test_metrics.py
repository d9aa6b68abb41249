"""PSNR / SSIM: the reference's values, scikit-image, hand computations and known closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from lightbsr.metrics import psnr, ssim

pytestmark = pytest.mark.unit

Y_WEIGHTS = np.array([65.738, 129.057, 25.064])


def _pair(seed: int, height: int = 40, width: int = 52, noise: float = 12.0) -> tuple[torch.Tensor, torch.Tensor]:
    """An HR image on 8-bit levels and a distorted SR, both (1, 3, H, W) in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    hr = torch.randint(0, 256, (1, 3, height, width), generator=generator).double()
    sr = (hr + noise * torch.randn(hr.shape, generator=generator, dtype=torch.float64)).clamp(0, 255).round()
    return sr / 255.0, hr / 255.0


def _y_numpy(image: torch.Tensor, divisor: float, offset: float) -> np.ndarray:
    rgb = np.transpose(image[0].double().numpy() * 255.0, (1, 2, 0))  # (H, W, 3) on 0..255
    return rgb @ Y_WEIGHTS / divisor + offset


def test_metrics_match_reference_values(parity_vectors):
    for case in parity_vectors["metrics"]:
        ours_psnr = psnr(case["sr"], case["hr"], case["scale"])
        ours_ssim = ssim(case["sr"], case["hr"], case["scale"])
        assert ours_psnr.shape == ours_ssim.shape == (1,)
        assert abs(ours_psnr.item() - case["psnr_y"]) <= 1e-4
        assert abs(ours_ssim.item() - case["ssim_y"]) <= 1e-5


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_ssim_y_matches_scikit_image_on_the_same_y(scale):
    sr, hr = _pair(scale)
    crop = (slice(scale, -scale), slice(scale, -scale))
    sr_y, hr_y = _y_numpy(sr, 255.0, 16.0)[crop], _y_numpy(hr, 255.0, 16.0)[crop]
    expected = structural_similarity(
        sr_y, hr_y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )
    assert ssim(sr, hr, scale).item() == pytest.approx(expected, abs=1e-9)


def test_ssim_rgb_is_the_channel_mean_of_scikit_image():
    sr, hr = _pair(5)
    crop = (slice(4, -4), slice(4, -4))
    sr_rgb = np.transpose(sr[0].numpy() * 255.0, (1, 2, 0))[crop]
    hr_rgb = np.transpose(hr[0].numpy() * 255.0, (1, 2, 0))[crop]
    expected = structural_similarity(
        sr_rgb,
        hr_rgb,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
        channel_axis=2,
    )
    assert ssim(sr, hr, 4, y_channel=False).item() == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("scale", [2, 4])
def test_psnr_matches_hand_computation(scale):
    sr, hr = _pair(10 + scale)
    crop = (slice(scale, -scale), slice(scale, -scale))
    diff_y = (_y_numpy(sr, 256.0, 0.0) - _y_numpy(hr, 256.0, 0.0))[crop]
    expected_y = 10 * math.log10(255.0**2 / np.mean(diff_y**2))
    diff_rgb = (sr[0].numpy() - hr[0].numpy())[:, scale:-scale, scale:-scale] * 255.0
    expected_rgb = 10 * math.log10(255.0**2 / np.mean(diff_rgb**2))
    assert psnr(sr, hr, scale).item() == pytest.approx(expected_y, abs=1e-9)
    assert psnr(sr, hr, scale, y_channel=False).item() == pytest.approx(expected_rgb, abs=1e-9)


def test_metrics_quantise_to_8bit_levels():
    sr, hr = _pair(20)
    jitter = (torch.rand(sr.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.5) * 0.9
    off_level = (sr * 255.0 + jitter) / 255.0  # still rounds to the same levels
    assert psnr(off_level, hr, 4).item() == psnr(sr, hr, 4).item()
    assert ssim(off_level, hr, 4).item() == ssim(sr, hr, 4).item()


def test_identical_images_give_infinite_psnr_and_unit_ssim():
    _, hr = _pair(21)
    assert math.isinf(psnr(hr, hr, 4).item()) and psnr(hr, hr, 4).item() > 0
    assert ssim(hr, hr, 4).item() == pytest.approx(1.0, abs=1e-12)
    assert ssim(hr, hr, 4, y_channel=False).item() == pytest.approx(1.0, abs=1e-12)


def test_one_level_offset_has_its_closed_form_values():
    level = 100.0
    hr = torch.full((1, 3, 32, 32), level / 255.0)
    sr = torch.full((1, 3, 32, 32), (level + 1.0) / 255.0)
    y_step_psnr = Y_WEIGHTS.sum() / 256.0  # Y difference of a one-level RGB step, PSNR convention
    assert psnr(sr, hr, 4).item() == pytest.approx(10 * math.log10(255.0**2 / y_step_psnr**2), abs=1e-9)
    assert psnr(sr, hr, 4, y_channel=False).item() == pytest.approx(20 * math.log10(255.0), abs=1e-9)
    # flat images: no variance, SSIM is the luminance term (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)
    c1 = (0.01 * 255.0) ** 2
    mu_hr = level * Y_WEIGHTS.sum() / 255.0 + 16.0
    mu_sr = (level + 1.0) * Y_WEIGHTS.sum() / 255.0 + 16.0
    expected = (2 * mu_hr * mu_sr + c1) / (mu_hr**2 + mu_sr**2 + c1)
    assert ssim(sr, hr, 4).item() == pytest.approx(expected, abs=1e-12)


def test_metrics_are_per_image():
    pairs = [_pair(30 + i, noise=4.0 * (i + 1)) for i in range(3)]
    sr = torch.cat([p[0] for p in pairs])
    hr = torch.cat([p[1] for p in pairs])
    batch_psnr, batch_ssim = psnr(sr, hr, 3), ssim(sr, hr, 3)
    assert batch_psnr.shape == batch_ssim.shape == (3,)
    for i, (one_sr, one_hr) in enumerate(pairs):
        assert batch_psnr[i].item() == psnr(one_sr, one_hr, 3).item()
        assert batch_ssim[i].item() == pytest.approx(ssim(one_sr, one_hr, 3).item(), abs=1e-12)
    assert batch_psnr[0] > batch_psnr[1] > batch_psnr[2]


def test_bad_metric_inputs_are_rejected():
    sr, hr = _pair(40)
    with pytest.raises(ValueError, match=r"\(1, 3, 40, 50\)"):
        psnr(sr[..., :50], hr, 4)
    with pytest.raises(ValueError, match="sr"):
        ssim(sr[:, :1], hr[:, :1], 4)
    with pytest.raises(ValueError, match=r"16x16.*border of 4"):
        ssim(sr[..., :16, :16], hr[..., :16, :16], 4)
