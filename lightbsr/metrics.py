"""PSNR and SSIM exactly as the reference's benchmark evaluation computes them (spec section 4).

Both take float (B, 3, H, W) tensors in [0, 1], quantise them to 8-bit levels, cut `scale`
pixels off every side and return one value per image, (B,) float64. The reference uses two
different luma conventions, kept here on purpose so numbers compare with the paper, DASR, KDSR:

* PSNR (Y): the RGB difference on 0..255 weighted by (65.738, 129.057, 25.064) / 256 (no offset);
* SSIM (Y): Y = RGB255 . (65.738, 129.057, 25.064) / 255 + 16 (BT.601 studio range), 11x11
  Gaussian window (sigma 1.5), 'valid' filtering, C1 = (0.01*255)^2, C2 = (0.03*255)^2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["psnr", "quantize", "rgb_to_y", "ssim"]

Y_WEIGHTS = (65.738, 129.057, 25.064)
PSNR_Y_DIVISOR = 256.0
SSIM_Y_DIVISOR = 255.0
SSIM_Y_OFFSET = 16.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = (0.01 * 255.0) ** 2
SSIM_C2 = (0.03 * 255.0) ** 2


def _check_pair(sr: torch.Tensor, hr: torch.Tensor, scale: int) -> None:
    for name, image in (("sr", sr), ("hr", hr)):
        if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[1] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"{name}: expected a (B, 3, H, W) tensor in [0, 1], got {shape}")
    if sr.shape != hr.shape:
        raise ValueError(f"sr and hr: expected the same shape, got {tuple(sr.shape)} and {tuple(hr.shape)}")
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 0:
        raise ValueError(f"scale: expected a non-negative integer (the border cut), got {scale!r}")


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> nearest 8-bit level on the 0..255 scale, float64."""
    return (x.detach().to(torch.float64) * 255.0).clamp(0.0, 255.0).round()


def rgb_to_y(rgb255: torch.Tensor, divisor: float = SSIM_Y_DIVISOR, offset: float = SSIM_Y_OFFSET) -> torch.Tensor:
    """(B, 3, H, W) on 0..255 -> (B, 1, H, W): RGB . (65.738, 129.057, 25.064) / divisor + offset."""
    weights = torch.tensor(Y_WEIGHTS, dtype=rgb255.dtype, device=rgb255.device).view(1, 3, 1, 1)
    return (rgb255 * weights).sum(dim=1, keepdim=True) / divisor + offset


def _shave(x: torch.Tensor, border: int, min_size: int, name: str) -> torch.Tensor:
    height, width = x.shape[-2:]
    if height - 2 * border < min_size or width - 2 * border < min_size:
        raise ValueError(
            f"{name}: a {height}x{width} image is too small for a border of {border} pixels"
            f" (need at least {min_size + 2 * border}x{min_size + 2 * border})"
        )
    return x[..., border : height - border, border : width - border] if border else x


def psnr(sr: torch.Tensor, hr: torch.Tensor, scale: int, y_channel: bool = True) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, (B,) float64; inf for identical images.

    y_channel=True: the reference's benchmark PSNR (Y difference with the /256 weights).
    y_channel=False: MSE over all three RGB channels on 0..255, same quantisation and border.
    """
    _check_pair(sr, hr, scale)
    diff = quantize(sr) - quantize(hr)  # (B, 3, H, W) on 0..255
    if y_channel:
        diff = rgb_to_y(diff, divisor=PSNR_Y_DIVISOR, offset=0.0)  # (B, 1, H, W)
    diff = _shave(diff, scale, 1, "psnr")
    mse = diff.pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(255.0**2 / mse)


def _gaussian_window(device: torch.device) -> torch.Tensor:
    """11x11 Gaussian, sigma 1.5, normalised, (1, 1, 11, 11) float64 (cv2.getGaussianKernel squared)."""
    axis = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - SSIM_WINDOW // 2
    taps = torch.exp(-(axis**2) / (2.0 * SSIM_SIGMA**2))
    taps = taps / taps.sum()
    return torch.outer(taps, taps).view(1, 1, SSIM_WINDOW, SSIM_WINDOW)


def _ssim_map_mean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean SSIM map of (N, 1, H, W) float64 pairs -> (N,), 'valid' filtering."""
    window = _gaussian_window(x.device)
    mu_x, mu_y = F.conv2d(x, window), F.conv2d(y, window)
    var_x = F.conv2d(x * x, window) - mu_x**2
    var_y = F.conv2d(y * y, window) - mu_y**2
    cov = F.conv2d(x * y, window) - mu_x * mu_y
    numerator = (2.0 * mu_x * mu_y + SSIM_C1) * (2.0 * cov + SSIM_C2)
    denominator = (mu_x**2 + mu_y**2 + SSIM_C1) * (var_x + var_y + SSIM_C2)
    return (numerator / denominator).mean(dim=(1, 2, 3))


def ssim(sr: torch.Tensor, hr: torch.Tensor, scale: int, y_channel: bool = True) -> torch.Tensor:
    """Structural similarity, (B,) float64; 1 for identical images.

    y_channel=True: the reference's (MATLAB-equivalent) SSIM on the studio-range Y channel.
    y_channel=False: the same SSIM computed on each RGB channel (0..255) and averaged over the
    three channels.
    """
    _check_pair(sr, hr, scale)
    sr255, hr255 = quantize(sr), quantize(hr)
    if y_channel:
        sr255, hr255 = rgb_to_y(sr255), rgb_to_y(hr255)  # (B, 1, H, W)
    sr255 = _shave(sr255, scale, SSIM_WINDOW, "ssim")
    hr255 = _shave(hr255, scale, SSIM_WINDOW, "ssim")
    batch, channels, height, width = sr255.shape
    per_channel = _ssim_map_mean(
        sr255.reshape(batch * channels, 1, height, width), hr255.reshape(batch * channels, 1, height, width)
    )
    return per_channel.view(batch, channels).mean(dim=1)
