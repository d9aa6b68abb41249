"""Degradation synthesis: Gaussian blur kernels, MATLAB bicubic, noise, 8-bit rounding, kernel PCA.

HR (B, 3, H, W) in [0, 1] -> blur with a 21x21 kernel (reflect pad 10) -> MATLAB-style bicubic
downsampling by s (a = -0.5, antialiased) -> + N(0, sigma) on the 0..255 scale -> round and clip
to 8-bit levels -> [0, 1]. Conventions follow the authors' reference (DASR lineage):

* kernel grid: offsets -k//2 .. k//2; x runs along columns, y along rows (downwards);
* anisotropic covariance R diag(l1^2, l2^2) R^T with R = [[cos t, -sin t], [sin t, cos t]] acting
  on (x, y): lambda1 is the standard deviation along the direction (cos t, sin t);
* the bicubic repeats the edge pixel where the MATLAB window leaves the image (the reference
  clamps its indices; MATLAB itself mirrors), so results match the reference, not MATLAB, at borders.

Everything is batched, with no Python loop per image; blur and bicubic are both linear, so they
are fused (the pixels equal blur-then-bicubic up to float rounding, ~4e-4 on 0..255):
* separable kernels (every isotropic Gaussian): two per-image matrices, LR = A_b X B_b^T;
* other kernels, on CPU: stride-s grouped convolutions of the reflect-padded HR by "composite"
  kernels (blur kernel convolved with the bicubic taps), one for the interior and small ones
  for the edge rows / columns where the bicubic clamps;
* `blur` + `bicubic_downsample` (one grouped convolution, two matmuls with cached weight
  matrices): the plain path, used on GPUs and for images too small for the fused one.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "KERNEL_SIZE",
    "PCA_COMPONENTS",
    "Degradation",
    "DegradationSampler",
    "anisotropic_gaussian_kernel",
    "bicubic_downsample",
    "bicubic_upsample",
    "blur",
    "degrade",
    "isotropic_gaussian_kernel",
    "kernel_pca_basis",
    "pca_kernel_population",
    "prior_vector",
]

KERNEL_SIZE = 21
PCA_COMPONENTS = 15
NOISE_PRIOR_CHANNELS = 3
#: setting 1 (isotropic, no noise): sigma ranges per scale (the DASR protocol).
ISO_SIGMA_RANGE = {2: (0.2, 2.0), 3: (0.2, 3.0), 4: (0.2, 4.0)}
#: setting 2 (anisotropic + noise): std devs along the principal axes, and noise sigma (0..255).
ANISO_LAMBDA_RANGE = (0.2, 4.0)
NOISE_SIGMA_RANGE = (0.0, 25.0)
#: kernel population of the PCA basis (see `pca_kernel_population`).
PCA_VARIANCE_OFFSET = 0.1
PCA_VARIANCE_SPAN = 10.0


# ----------------------------------------------------------------------------- kernels


def _as_batch(value: float | torch.Tensor, name: str) -> torch.Tensor:
    """A float or (B,) tensor -> (B,) float64 tensor (keeps the device)."""
    tensor = torch.as_tensor(value, dtype=torch.float64)
    if tensor.dim() == 0:
        tensor = tensor.reshape(1)
    if tensor.dim() != 1:
        raise ValueError(f"{name}: expected a float or a (B,) tensor, got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name}: expected finite values, got {tensor.tolist()}")
    return tensor


def _check_positive(value: torch.Tensor, name: str) -> None:
    if (value <= 0).any():
        raise ValueError(f"{name}: expected standard deviations > 0, got {value.tolist()}")


def _check_kernel_size(size: int) -> None:
    if not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size: expected a positive odd integer, got {size!r}")


def _kernel_grid(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Column offsets x and row offsets y, each (size, size) float64, centred on the middle tap."""
    axis = torch.arange(size, dtype=torch.float64, device=device) - size // 2
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return x, y


def _normalised(kernel: torch.Tensor) -> torch.Tensor:
    return (kernel / kernel.sum(dim=(1, 2), keepdim=True)).to(torch.float32)


def isotropic_gaussian_kernel(sigma: float | torch.Tensor, size: int = KERNEL_SIZE) -> torch.Tensor:
    """exp(-(x^2 + y^2) / (2 sigma^2)) on a size x size grid, normalised -> (B, size, size) float32."""
    _check_kernel_size(size)
    sigma = _as_batch(sigma, "sigma")
    _check_positive(sigma, "sigma")
    x, y = _kernel_grid(size, sigma.device)
    s2 = sigma.view(-1, 1, 1) ** 2
    return _normalised(torch.exp(-(x**2 + y**2) / (2.0 * s2)))


def anisotropic_gaussian_kernel(
    theta: float | torch.Tensor,
    lambda1: float | torch.Tensor,
    lambda2: float | torch.Tensor,
    size: int = KERNEL_SIZE,
) -> torch.Tensor:
    """Gaussian with covariance R diag(lambda1^2, lambda2^2) R^T, theta in radians -> (B, size, size).

    lambda1 / lambda2 are standard deviations along the principal axes; lambda1's axis points
    along (cos theta, sin theta) in (column, row) coordinates. Floats broadcast against tensors.
    """
    _check_kernel_size(size)
    angle, std1, std2 = torch.broadcast_tensors(
        _as_batch(theta, "theta"), _as_batch(lambda1, "lambda1"), _as_batch(lambda2, "lambda2")
    )
    _check_positive(std1, "lambda1")
    _check_positive(std2, "lambda2")
    cos, sin = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    inv1, inv2 = (1.0 / std1**2).view(-1, 1, 1), (1.0 / std2**2).view(-1, 1, 1)
    x, y = _kernel_grid(size, angle.device)
    # coordinates in the principal frame: u along (cos, sin), v along (-sin, cos)
    u = cos * x + sin * y
    v = -sin * x + cos * y
    return _normalised(torch.exp(-0.5 * (u**2 * inv1 + v**2 * inv2)))


def _check_kernels(kernel: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """Require (B, k, k) or (k, k) with k odd; returns (B, k, k)."""
    if not isinstance(kernel, torch.Tensor) or not kernel.is_floating_point():
        raise ValueError(f"kernel: expected a float tensor of shape (B, k, k), got {type(kernel).__name__}")
    if kernel.dim() == 2:
        kernel = kernel.unsqueeze(0)
    if kernel.dim() != 3 or kernel.shape[1] != kernel.shape[2] or kernel.shape[1] % 2 == 0:
        raise ValueError(f"kernel: expected a square, odd-sized (B, k, k) tensor, got shape {tuple(kernel.shape)}")
    if batch is not None and kernel.shape[0] not in (1, batch):
        raise ValueError(f"kernel: expected {batch} kernels (one per image) or 1, got {kernel.shape[0]}")
    return kernel


# ----------------------------------------------------------------------------- bicubic


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys cubic convolution kernel with a = -0.5 (MATLAB's 'bicubic')."""
    ax = x.abs()
    near = (1.5 * ax**3 - 2.5 * ax**2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax**3 + 2.5 * ax**2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


@functools.lru_cache(maxsize=64)
def _bicubic_matrix_cpu(in_size: int, scale: int, shrink: bool = True) -> torch.Tensor:
    """float64 MATLAB imresize 'bicubic' weights: (in_size/scale, in_size) shrinking by `scale`,
    (in_size*scale, in_size) enlarging by it.

    Shrinking is antialiased: the cubic is stretched by `scale`. Out-of-range taps are clamped to
    the edge pixel (as the reference does), so their weight accumulates on the first / last column.
    """
    stretch = scale if shrink else 1
    out_size = in_size // scale if shrink else in_size * scale
    out = torch.arange(1, out_size + 1, dtype=torch.float64)
    centre = out * scale + 0.5 * (1 - scale) if shrink else out / scale + 0.5 * (1 - 1 / scale)  # 1-based
    left = torch.floor(centre - 2.0 * stretch)
    index = left.unsqueeze(1) + torch.arange(4 * stretch + 2, dtype=torch.float64)  # (out, taps), 1-based
    weight = _cubic((centre.unsqueeze(1) - index) / stretch) / stretch
    weight = weight / weight.sum(dim=1, keepdim=True)
    column = (index.clamp(1, in_size) - 1).long()
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    matrix.scatter_add_(1, column, weight)
    return matrix


def _bicubic_matrix(
    in_size: int, scale: int, device: torch.device, dtype: torch.dtype, shrink: bool = True
) -> torch.Tensor:
    """`_bicubic_matrix_cpu` on `device` in `dtype`, cached (evaluation images come in many sizes)."""
    return _bicubic_matrix_on(in_size, scale, str(device), dtype, shrink)


@functools.lru_cache(maxsize=64)
def _bicubic_matrix_on(in_size: int, scale: int, device: str, dtype: torch.dtype, shrink: bool) -> torch.Tensor:
    return _bicubic_matrix_cpu(in_size, scale, shrink).to(device=device, dtype=dtype)


def _check_scale(scale: int) -> None:
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise ValueError(f"scale: expected a positive integer, got {scale!r}")


def _check_divisible(height: int, width: int, scale: int, name: str) -> None:
    if height % scale or width % scale or height < scale or width < scale:
        raise ValueError(
            f"{name}: height and width must be positive multiples of the scale {scale}, got {height}x{width}"
            f" (crop to {height // scale * scale}x{width // scale * scale} first)"
        )


def bicubic_downsample(x: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, C, H, W) float -> (B, C, H/s, W/s): MATLAB imresize bicubic, antialiased, edge-clamped.

    Linear in x, so any value range works (the reference runs it on 0..255). H, W multiples of s.
    """
    _check_scale(scale)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected a float tensor of shape (B, C, H, W), got {shape}")
    height, width = x.shape[-2:]
    _check_divisible(height, width, scale, "x")
    rows = _bicubic_matrix(height, scale, x.device, x.dtype)  # (H/s, H)
    cols = _bicubic_matrix(width, scale, x.device, x.dtype)  # (W/s, W)
    return rows @ x @ cols.T  # (B, C, H/s, W/s)


def bicubic_upsample(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, h*s, w*s) bicubic upscaling (the baseline row of evaluation tables)."""
    rows = _bicubic_matrix(lr.shape[-2], scale, lr.device, lr.dtype, shrink=False)  # (h*s, h)
    cols = _bicubic_matrix(lr.shape[-1], scale, lr.device, lr.dtype, shrink=False)  # (w*s, w)
    return rows @ lr @ cols.T


# ----------------------------------------------------------------------------- blur + pipeline


def _rank_one_factors(kernel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Column and row factors (B, k) float64 when every kernel is separable (k = col row^T), else None."""
    u, s, vh = torch.linalg.svd(kernel.to(torch.float64))
    if (s[:, 1] > 1e-7 * s[:, 0]).any():
        return None
    sign = torch.sign(u[:, :, 0].sum(dim=1, keepdim=True))
    root = s[:, :1].sqrt()
    return u[:, :, 0] * root * sign, vh[:, 0, :] * root * sign


def _check_blur_size(height: int, width: int, size: int) -> None:
    if height <= size // 2 or width <= size // 2:
        raise ValueError(
            f"hr: a {size}x{size} kernel needs images larger than {size // 2} pixels (reflect pad),"
            f" got {height}x{width}"
        )


def _reflected_blur_matrix(taps: torch.Tensor, length: int) -> torch.Tensor:
    """(B, k) 1-D kernels -> (B, length, length) float64: reflect pad k//2, then correlate."""
    batch, size = taps.shape
    pad = size // 2
    source = torch.arange(length).view(-1, 1) + torch.arange(size).view(1, -1) - pad  # (length, k)
    source = torch.where(source < 0, -source, source)
    source = torch.where(source >= length, 2 * (length - 1) - source, source)
    matrix = torch.zeros(batch, length, length, dtype=torch.float64, device=taps.device)
    matrix.scatter_add_(2, source.to(taps.device).expand(batch, -1, -1), taps.unsqueeze(1).expand(-1, length, -1))
    return matrix


def _separable_blur_downsample(x: torch.Tensor, col: torch.Tensor, row: torch.Tensor, scale: int) -> torch.Tensor:
    """Blur with col row^T (reflect pad) then bicubic, folded into two matmuls per image.

    x (G, C, H, W); col, row (G, k) float64 -> (G, C, H/s, W/s). The operators are linear, so
    bicubic(blur(x)) = (Wh Bh) x (Ww Bw)^T: about 6x fewer multiply-adds than conv + bicubic.
    """
    height, width = x.shape[-2:]
    rows = _bicubic_matrix(height, scale, x.device, torch.float64) @ _reflected_blur_matrix(col, height)
    cols = _bicubic_matrix(width, scale, x.device, torch.float64) @ _reflected_blur_matrix(row, width)
    rows, cols = rows.to(x.dtype).unsqueeze(1), cols.to(x.dtype).unsqueeze(1)  # (G, 1, H/s, H), (G, 1, W/s, W)
    return rows @ x @ cols.transpose(-1, -2)


def blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Blur image b of (B, C, H, W) with kernel b of (B, k, k) (or one kernel for all), reflect pad k//2.

    One grouped convolution for the whole batch. The kernels are applied as correlations, like
    the reference (identical to convolution for the centrally symmetric Gaussians).
    """
    batch, channels, height, width = x.shape
    kernel = _check_kernels(kernel, batch)
    size = kernel.shape[-1]
    pad = size // 2
    _check_blur_size(height, width, size)
    kernel = kernel.to(device=x.device, dtype=x.dtype).expand(batch, size, size)
    padded = F.pad(x.reshape(1, batch * channels, height, width), (pad, pad, pad, pad), mode="reflect")
    weight = kernel.repeat_interleave(channels, dim=0).view(batch * channels, 1, size, size)
    return F.conv2d(padded, weight, groups=batch * channels).view(batch, channels, height, width)


@functools.lru_cache(maxsize=8)
def _bicubic_taps(scale: int) -> tuple[torch.Tensor, int]:
    """The taps every interior output shares (float64), and where they start: input s*i + start."""
    probe = 8
    row = _bicubic_matrix_cpu(4 * probe * scale, scale)[probe]
    nonzero = row.nonzero().flatten()
    first, last = int(nonzero[0]), int(nonzero[-1])
    return row[first : last + 1].clone(), first - probe * scale


@dataclass(frozen=True)
class _TapClass:
    """Consecutive outputs along one axis that share one tap pattern: output first + n reads
    inputs start + s*n .. start + s*n + len(taps) - 1 with weights `taps`."""

    first: int
    count: int
    start: int
    taps: torch.Tensor  # (L,) float64


@functools.lru_cache(maxsize=64)
def _tap_classes(size: int, scale: int) -> tuple[_TapClass, ...] | None:
    """The interior outputs (one class) and each edge output (clamped taps, its own class).

    Every output's taps fit in a window of the interior length L: edge outputs at the start read
    inputs [0, L), at the end [size - L, size). None when the image has no interior output.
    """
    taps, start = _bicubic_taps(scale)
    length, out_size = len(taps), size // scale
    lo = -(start // scale)  # first output whose taps start inside the image
    hi = min((size - start - length) // scale + 1, out_size)  # one past the last such output
    if hi - lo < 1 or size < length:
        return None
    matrix = _bicubic_matrix_cpu(size, scale)

    def edge(i: int, window: int) -> _TapClass:
        return _TapClass(i, 1, window, matrix[i, window : window + length].clone())

    return (
        *(edge(i, 0) for i in range(lo)),
        _TapClass(lo, hi - lo, scale * lo + start, taps),
        *(edge(i, size - length) for i in range(hi, out_size)),
    )


def _full_convolution_matrix(taps: torch.Tensor, size: int) -> torch.Tensor:
    """(L,) taps -> (L + size - 1, size) matrix T with (T k)[P] = sum_a taps[P - a] k[a]."""
    length = len(taps)
    offset = torch.arange(length + size - 1).view(-1, 1) - torch.arange(size).view(1, -1)  # P - a
    inside = (offset >= 0) & (offset < length)
    return torch.where(inside, taps[offset.clamp(0, length - 1)], torch.zeros((), dtype=taps.dtype))


def _composite_kernels(
    kernel: torch.Tensor, row_classes: tuple[_TapClass, ...], col_classes: tuple[_TapClass, ...]
) -> torch.Tensor:
    """Blur kernels (G, k, k) -> (rows, cols, G, L+k-1, L+k-1) float64 blur-then-bicubic kernels.

    C = T_row K T_col^T: the full 2-D convolution of the kernel with the outer product of the
    two tap vectors, so applying C to the reflect-padded input blurs, then takes the bicubic sum.
    """
    size = kernel.shape[-1]
    left = torch.stack([_full_convolution_matrix(c.taps, size) for c in row_classes]).to(kernel.device)
    right = torch.stack([_full_convolution_matrix(c.taps, size) for c in col_classes]).to(kernel.device)
    blurred = left[:, None] @ kernel.to(torch.float64)[None]  # (rows, G, Lc, k)
    return blurred[:, None] @ right[None, :, None].transpose(-1, -2)  # (rows, cols, G, Lc, Lc)


def _strided_blur_downsample(x: torch.Tensor, kernel: torch.Tensor, scale: int) -> torch.Tensor | None:
    """Blur then bicubic as strided convolutions of the reflect-padded input by composite kernels.

    x (G, C, H, W), kernel (G, k, k) -> (G, C, H/s, W/s), or None for images too small to have an
    interior. Outputs are grouped by their (row, column) tap patterns: the interior block is one
    stride-s convolution, each edge row / column / corner a small one. About 6x fewer
    multiply-adds than blurring every HR pixel and resampling.
    """
    groups, channels, height, width = x.shape
    row_classes, col_classes = _tap_classes(height, scale), _tap_classes(width, scale)
    if row_classes is None or col_classes is None:
        return None
    size = kernel.shape[-1]
    composite = _composite_kernels(kernel, row_classes, col_classes).to(x.dtype)  # (R, C, G, Lc, Lc)
    span = composite.shape[-1]
    padded = F.pad(x.reshape(1, groups * channels, height, width), (size // 2,) * 4, mode="reflect")
    bands = []
    for r, row in enumerate(row_classes):
        blocks = []
        for c, col in enumerate(col_classes):
            window = padded[
                ...,
                row.start : row.start + scale * (row.count - 1) + span,
                col.start : col.start + scale * (col.count - 1) + span,
            ]
            weight = composite[r, c].repeat_interleave(channels, dim=0).unsqueeze(1)  # (G*C, 1, Lc, Lc)
            blocks.append(F.conv2d(window, weight, stride=scale, groups=groups * channels))
        bands.append(torch.cat(blocks, dim=-1))
    return torch.cat(bands, dim=-2).view(groups, channels, height // scale, width // scale)


def _blur_downsample(x: torch.Tensor, kernel: torch.Tensor, scale: int) -> torch.Tensor:
    """x (G, C, H, W), kernel (G | 1, k, k) -> (G, C, H/s, W/s) on the fastest exact path.

    The composite strided convolutions only pay off on CPU: on a GPU the plain grouped 21x21
    convolution is ~3x faster than them (benchmarks/degrade.py on an H200).
    """
    _check_blur_size(x.shape[-2], x.shape[-1], kernel.shape[-1])
    kernel = kernel.expand(x.shape[0], -1, -1)
    factors = _rank_one_factors(kernel)  # where the kernels live (CPU from the sampler): no GPU sync
    if factors is not None:
        col, row = factors
        return _separable_blur_downsample(x, col.to(x.device), row.to(x.device), scale)
    kernel = kernel.to(x.device)
    strided = _strided_blur_downsample(x, kernel, scale) if x.device.type == "cpu" else None
    return strided if strided is not None else bicubic_downsample(blur(x, kernel), scale)


def _noise_levels(noise_sigma: float | torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
    return None if noise_sigma is None else _noise_batch(noise_sigma, batch, device)


def _noise_batch(noise_sigma: float | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """A float or (B,) noise sigma (0..255 scale) -> checked (batch,) float32 on `device`."""
    sigma = _as_batch(noise_sigma, "noise_sigma").to(device=device, dtype=torch.float32)
    if sigma.shape[0] not in (1, batch):
        raise ValueError(f"noise_sigma: expected {batch} values (one per image) or 1, got {sigma.shape[0]}")
    if (sigma < 0).any():
        raise ValueError(f"noise_sigma: expected values >= 0 (0..255 scale), got {sigma.tolist()}")
    return sigma.expand(batch)


def _check_hr(hr: torch.Tensor, name: str = "hr") -> None:
    if not isinstance(hr, torch.Tensor) or not hr.is_floating_point() or hr.dim() != 4:
        shape = tuple(hr.shape) if isinstance(hr, torch.Tensor) else type(hr).__name__
        raise ValueError(f"{name}: expected a float tensor of shape (B, C, H, W) in [0, 1], got {shape}")


def _degrade_255(
    hr: torch.Tensor,
    kernel: torch.Tensor,
    scale: int,
    sigma: torch.Tensor | None,
    generator: torch.Generator | None,
    repeats: int = 1,
) -> torch.Tensor:
    """Pipeline core. hr (B*repeats, C, H, W) in [0,1]; kernel / sigma per group of `repeats` images."""
    batch, channels, height, width = hr.shape
    groups = batch // repeats
    # views of one item share its kernel: process them as (groups, repeats*C, H, W)
    lr = _blur_downsample((hr * 255.0).reshape(groups, repeats * channels, height, width), kernel, scale)
    lr = lr.reshape(batch, channels, height // scale, width // scale)  # 0..255
    if sigma is not None:
        noise = torch.randn(lr.shape, generator=generator, device=lr.device, dtype=lr.dtype)
        lr = lr + noise * sigma.repeat_interleave(repeats).to(lr.dtype).view(-1, 1, 1, 1)
    return lr.round().clamp(0.0, 255.0) / 255.0


def degrade(
    hr: torch.Tensor,
    kernel: torch.Tensor,
    scale: int,
    noise_sigma: float | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """HR (B, C, H, W) in [0, 1] -> LR (B, C, H/s, W/s) on 8-bit levels in [0, 1].

    kernel: (B, k, k) (one per image) or (k, k); noise_sigma: None, a float or (B,) on the 0..255
    scale; the noise is drawn from `generator` (on hr's device), or the global RNG when None.
    """
    _check_hr(hr)
    _check_scale(scale)
    _check_divisible(hr.shape[-2], hr.shape[-1], scale, "hr")
    kernel = _check_kernels(kernel, hr.shape[0])
    sigma = _noise_levels(noise_sigma, hr.shape[0], hr.device)
    return _degrade_255(hr, kernel, scale, sigma, generator)


# ----------------------------------------------------------------------------- PCA prior


def pca_kernel_population(seed: int = 0, n_kernels: int = 5000, size: int = KERNEL_SIZE) -> torch.Tensor:
    """The seeded random anisotropic kernels (n_kernels, size, size) the PCA basis is fitted on.

    Drawn as the reference draws them (IKC/KAIR `cal_pca_matrix` with l_max = 10): covariance
    eigenvalues (variances) l1 = 0.1 + 10 u, l2 = 0.1 + (l1 - 0.1) u', theta = pi u''.
    """
    generator = torch.Generator().manual_seed(seed)
    draws = torch.rand(3, n_kernels, generator=generator, dtype=torch.float64)
    theta = math.pi * draws[0]
    var1 = PCA_VARIANCE_OFFSET + PCA_VARIANCE_SPAN * draws[1]
    var2 = PCA_VARIANCE_OFFSET + (var1 - PCA_VARIANCE_OFFSET) * draws[2]
    return anisotropic_gaussian_kernel(theta, var1.sqrt(), var2.sqrt(), size)


def kernel_pca_basis(
    seed: int = 0, n_kernels: int = 5000, n_components: int = PCA_COMPONENTS, size: int = KERNEL_SIZE
) -> torch.Tensor:
    """Uncentred PCA basis (size*size, n_components) float32 of `pca_kernel_population(seed)`.

    The top eigenvectors of K^T K (kernels flattened row-major), ordered by decreasing
    eigenvalue, each signed so its entries sum to >= 0. The reference leaves its draw unseeded,
    lists the components in increasing order and flattens column-major; a basis is only
    meaningful with the network trained on it, so it is saved with the checkpoint
    (`lightbsr.checkpoint.save_checkpoint`, key "pca_basis") and loaded back, never rebuilt.
    """
    if not 1 <= n_components <= min(n_kernels, size * size):
        raise ValueError(
            f"kernel_pca_basis: need 1 <= n_components <= min(n_kernels, size^2), got {n_components}"
            f" components of {n_kernels} {size}x{size} kernels"
        )
    flat = pca_kernel_population(seed, n_kernels, size).to(torch.float64).reshape(n_kernels, size * size)
    _, eigenvectors = torch.linalg.eigh(flat.T @ flat)  # ascending eigenvalues
    basis = eigenvectors[:, -n_components:].flip(1)  # (k*k, n_components), largest first
    basis = basis * torch.where(basis.sum(dim=0) < 0, -1.0, 1.0)
    return basis.to(torch.float32).contiguous()


def prior_vector(
    kernel: torch.Tensor, basis: torch.Tensor, noise_sigma: float | torch.Tensor | None = None
) -> torch.Tensor:
    """Teacher prior: kernel PCA code (B, 15), plus the noise sigma (0..255 scale) x3 -> (B, 18)."""
    kernel = _check_kernels(kernel)
    flat = kernel.reshape(kernel.shape[0], -1)
    if basis.dim() != 2 or basis.shape[0] != flat.shape[1]:
        raise ValueError(
            f"basis: expected ({flat.shape[1]}, n) for {kernel.shape[-1]}x{kernel.shape[-1]} kernels,"
            f" got shape {tuple(basis.shape)}"
        )
    code = flat.to(torch.float32) @ basis.to(device=flat.device, dtype=torch.float32)  # (B, 15)
    if noise_sigma is None:
        return code
    sigma = _noise_batch(noise_sigma, code.shape[0], code.device)
    return torch.cat([code, sigma.view(-1, 1).expand(-1, NOISE_PRIOR_CHANNELS)], dim=1)  # (B, 18)


# ----------------------------------------------------------------------------- sampler


@dataclass(frozen=True)
class Degradation:
    """n drawn degradations. Setting 1 stores sigma as lambda1 = lambda2 and theta = 0."""

    kernel: torch.Tensor  # (n, 21, 21) float32
    noise_sigma: torch.Tensor  # (n,) 0..255 scale; zeros in setting 1
    prior: torch.Tensor  # (n, 15) setting 1, (n, 18) setting 2
    theta: torch.Tensor  # (n,) radians
    lambda1: torch.Tensor  # (n,) std dev along theta
    lambda2: torch.Tensor  # (n,) std dev across theta

    def __len__(self) -> int:
        return self.kernel.shape[0]


class DegradationSampler:
    """Draws one degradation per HR item and applies it to all views of that item.

    setting 1: isotropic sigma ~ U[0.2, 2 | 3 | 4] at x2 | x3 | x4, no noise (15-d prior);
    setting 2: lambda1, lambda2 ~ U[0.2, 4], theta ~ U[0, pi), noise sigma ~ U[0, 25] (18-d prior).
    """

    def __init__(self, scale: int, setting: int, basis: torch.Tensor) -> None:
        if scale not in ISO_SIGMA_RANGE:
            raise ValueError(f"scale: expected one of {sorted(ISO_SIGMA_RANGE)}, got {scale!r}")
        if setting not in (1, 2):
            raise ValueError(f"setting: expected 1 (isotropic) or 2 (anisotropic + noise), got {setting!r}")
        if basis.dim() != 2 or basis.shape[0] != KERNEL_SIZE * KERNEL_SIZE:
            raise ValueError(f"basis: expected ({KERNEL_SIZE * KERNEL_SIZE}, n), got shape {tuple(basis.shape)}")
        self.scale = scale
        self.setting = setting
        self.basis = basis.to(torch.float32)

    @property
    def prior_channels(self) -> int:
        return self.basis.shape[1] + (NOISE_PRIOR_CHANNELS if self.setting == 2 else 0)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Degradation:
        """n independent degradations drawn from `generator` (a CPU generator)."""
        if n < 1:
            raise ValueError(f"n: expected at least one degradation, got {n}")
        draws = torch.rand(4, n, generator=generator, dtype=torch.float64)
        if self.setting == 1:
            low, high = ISO_SIGMA_RANGE[self.scale]
            sigma = low + (high - low) * draws[0]
            theta, lambda1, lambda2 = torch.zeros(n, dtype=torch.float64), sigma, sigma
            kernel = isotropic_gaussian_kernel(sigma)
            noise = torch.zeros(n, dtype=torch.float32)
            prior = prior_vector(kernel, self.basis)
        else:
            low, high = ANISO_LAMBDA_RANGE
            theta = math.pi * draws[0]
            lambda1 = low + (high - low) * draws[1]
            lambda2 = low + (high - low) * draws[2]
            kernel = anisotropic_gaussian_kernel(theta, lambda1, lambda2)
            noise = (NOISE_SIGMA_RANGE[0] + (NOISE_SIGMA_RANGE[1] - NOISE_SIGMA_RANGE[0]) * draws[3]).float()
            prior = prior_vector(kernel, self.basis, noise)
        return Degradation(kernel, noise, prior, theta.float(), lambda1.float(), lambda2.float())

    def degrade_views(
        self, hr_views: torch.Tensor, degradation: Degradation, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """hr_views (B, V, 3, H, W) in [0, 1] -> lr (B, V, 3, H/s, W/s); views of item b share degradation b."""
        if not isinstance(hr_views, torch.Tensor) or hr_views.dim() != 5 or not hr_views.is_floating_point():
            shape = tuple(hr_views.shape) if isinstance(hr_views, torch.Tensor) else type(hr_views).__name__
            raise ValueError(f"hr_views: expected a float tensor of shape (B, V, 3, H, W), got {shape}")
        batch, views, channels, height, width = hr_views.shape
        if len(degradation) != batch:
            raise ValueError(f"degradation: expected {batch} degradations (one per item), got {len(degradation)}")
        _check_divisible(height, width, self.scale, "hr_views")
        sigma = degradation.noise_sigma.to(hr_views.device) if self.setting == 2 else None
        flat = hr_views.reshape(batch * views, channels, height, width)
        lr = _degrade_255(flat, degradation.kernel, self.scale, sigma, generator, repeats=views)
        return lr.view(batch, views, channels, height // self.scale, width // self.scale)
