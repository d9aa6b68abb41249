"""Degradation pipeline: reference parity, independent checks of each stage, sampler, PCA prior."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from lightbsr.degrade import (
    Degradation,
    DegradationSampler,
    anisotropic_gaussian_kernel,
    bicubic_downsample,
    blur,
    degrade,
    isotropic_gaussian_kernel,
    kernel_pca_basis,
    pca_kernel_population,
    prior_vector,
)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def basis() -> torch.Tensor:
    return kernel_pca_basis(seed=0)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- reference parity


def test_kernels_match_reference(parity_vectors):
    vectors = parity_vectors["degradation"]
    pairs = [
        (isotropic_gaussian_kernel(2.0), vectors["iso_kernel_sigma2.0"]),
        (isotropic_gaussian_kernel(1.2), vectors["kernel_iso_s1.2"]),
        (anisotropic_gaussian_kernel(math.radians(30), 3.5, 1.5), vectors["aniso_kernel_t30_l3.5_l1.5"]),
        (anisotropic_gaussian_kernel(math.radians(30), 3.5, 1.5), vectors["kernel_aniso_t30_l3.5_l1.5"]),
    ]
    for ours, reference in pairs:
        assert ours.shape == reference.shape == (1, 21, 21)
        assert (ours - reference).abs().max() <= 1e-6


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_matches_reference(parity_vectors, scale):
    vectors = parity_vectors["degradation"]
    ours = bicubic_downsample(vectors["hr"], scale)  # hr on 0..255
    reference = vectors[f"bicubic_x{scale}"]
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max() <= 1e-3


@pytest.mark.parametrize("name", ["iso_s1.2", "aniso_t30_l3.5_l1.5"])
def test_full_pipeline_matches_reference_lr(parity_vectors, name):
    vectors = parity_vectors["degradation"]
    lr = degrade(vectors["hr"] / 255.0, vectors[f"kernel_{name}"], 4)
    levels = ((lr - vectors[f"lr_x4_{name}"]) * 255.0).round().abs()
    assert levels.max() <= 1
    assert (levels > 0).float().mean() < 0.005


# ----------------------------------------------------------------------------- kernels, independently


def _second_moments(kernel: torch.Tensor) -> torch.Tensor:
    """Covariance [[xx, xy], [xy, yy]] of a (21, 21) kernel, x along columns, y along rows."""
    axis = torch.arange(21, dtype=torch.float64) - 10
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    k = kernel.to(torch.float64)
    return torch.tensor([[(k * x * x).sum(), (k * x * y).sum()], [(k * x * y).sum(), (k * y * y).sum()]])


@pytest.mark.parametrize("theta_deg,lambda1,lambda2", [(0, 2.0, 0.8), (30, 2.0, 1.0), (90, 1.5, 0.9), (135, 1.8, 1.2)])
def test_anisotropic_kernel_covariance_is_rotated_diagonal(theta_deg, lambda1, lambda2):
    theta = math.radians(theta_deg)
    cos, sin = math.cos(theta), math.sin(theta)
    rotation = torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64)
    expected = rotation @ torch.diag(torch.tensor([lambda1**2, lambda2**2], dtype=torch.float64)) @ rotation.T
    kernel = anisotropic_gaussian_kernel(theta, lambda1, lambda2)[0]
    # for std devs in [0.8, 2] the 21x21 grid neither aliases nor truncates the moments beyond ~1e-5
    assert torch.allclose(_second_moments(kernel), expected, atol=1e-4)
    assert kernel.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_isotropic_kernel_is_anisotropic_with_equal_axes_and_batched():
    sigmas = torch.tensor([0.2, 1.3, 4.0])
    iso = isotropic_gaussian_kernel(sigmas)
    aniso = anisotropic_gaussian_kernel(torch.tensor([0.0, 1.0, 2.5]), sigmas, sigmas)
    assert iso.shape == (3, 21, 21) and iso.dtype == torch.float32
    assert (iso - aniso).abs().max() <= 1e-7
    assert torch.allclose(iso[1], isotropic_gaussian_kernel(1.3)[0])


# ----------------------------------------------------------------------------- bicubic, independently


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_interior_matches_pillow_bicubic(scale):
    """Pillow's antialiased bicubic (a = -0.5) is MATLAB's away from the border (they treat edges differently)."""
    image = torch.rand(1, 1, 48, 60, generator=_generator(scale)) * 255.0
    ours = bicubic_downsample(image, scale)[0, 0].numpy()
    pil = Image.fromarray(image[0, 0].numpy(), mode="F").resize((60 // scale, 48 // scale), Image.Resampling.BICUBIC)
    theirs = np.asarray(pil)
    assert np.abs(ours - theirs)[3:-3, 3:-3].max() < 1e-3
    assert np.abs(ours - theirs).max() > 1e-2  # the edge convention differs (edge clamp vs renormalised window)


def test_bicubic_reproduces_linear_ramp_at_output_centres():
    scale = 4
    ramp = torch.arange(1, 65, dtype=torch.float64).view(1, 1, 1, 64).expand(1, 1, 32, 64).contiguous()
    out = bicubic_downsample(ramp, scale)[0, 0, 0]
    centres = torch.arange(1, 17, dtype=torch.float64) * scale + 0.5 * (1 - scale)  # MATLAB's 1-based centres
    assert torch.allclose(out[2:-2], centres[2:-2], atol=1e-9)


def test_bicubic_runs_batched_and_keeps_constants():
    image = torch.full((5, 3, 24, 36), 0.25)
    out = bicubic_downsample(image, 3)
    assert out.shape == (5, 3, 8, 12)
    assert torch.allclose(out, torch.full_like(out, 0.25), atol=1e-6)


# ----------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("kind", ["isotropic", "anisotropic"])
@pytest.mark.parametrize("size", [(72, 60), (24, 36)])
def test_fused_paths_match_blur_then_bicubic(scale, kind, size):
    """degrade() fuses blur and bicubic (matmuls for separable kernels, composite strided convs else)."""
    generator = _generator(scale)
    hr = torch.rand(4, 3, *size, generator=generator)
    if kind == "isotropic":
        kernel = isotropic_gaussian_kernel(torch.tensor([0.2, 1.0, 2.5, 4.0]))
    else:
        kernel = anisotropic_gaussian_kernel(
            torch.rand(4, generator=generator) * math.pi,
            0.2 + 3.8 * torch.rand(4, generator=generator),
            0.2 + 3.8 * torch.rand(4, generator=generator),
        )
    fused = degrade(hr, kernel, scale)
    direct = bicubic_downsample(blur(hr * 255.0, kernel), scale).round().clamp(0, 255) / 255.0
    levels = ((fused - direct) * 255.0).round().abs()
    assert levels.max() <= 1 and (levels > 0).float().mean() < 0.005


def test_blur_uses_each_images_own_kernel():
    hr = torch.rand(1, 3, 40, 40, generator=_generator(2)).expand(3, -1, -1, -1)
    kernel = torch.stack([isotropic_gaussian_kernel(s)[0] for s in (0.5, 1.5, 3.0)])
    out = blur(hr, kernel)
    for b in range(3):
        assert torch.allclose(out[b : b + 1], blur(hr[:1], kernel[b]), atol=1e-6)
    assert not torch.allclose(out[0], out[2], atol=1e-3)


def test_degrade_noise_has_requested_sigma_and_is_seeded():
    hr = 0.3 + 0.4 * torch.rand(2, 3, 256, 256, generator=_generator(3))  # no clipping at 0 / 255
    kernel = isotropic_gaussian_kernel(torch.tensor([1.0, 1.0]))
    clean = degrade(hr, kernel, 4)
    noisy = degrade(hr, kernel, 4, torch.tensor([5.0, 20.0]), _generator(7))
    spread = ((noisy - clean) * 255.0).flatten(1).std(dim=1)
    assert spread[0].item() == pytest.approx(5.0, rel=0.05)
    assert spread[1].item() == pytest.approx(20.0, rel=0.05)
    assert torch.equal(noisy, degrade(hr, kernel, 4, torch.tensor([5.0, 20.0]), _generator(7)))
    assert not torch.equal(noisy, degrade(hr, kernel, 4, torch.tensor([5.0, 20.0]), _generator(8)))
    assert torch.equal(noisy * 255.0, (noisy * 255.0).round())  # 8-bit levels


# ----------------------------------------------------------------------------- PCA prior


def test_pca_basis_is_the_uncentred_pca_of_its_kernels():
    kernels = pca_kernel_population(seed=3, n_kernels=400, size=11).reshape(400, -1).numpy().astype(np.float64)
    basis = kernel_pca_basis(seed=3, n_kernels=400, size=11).numpy().astype(np.float64)
    _, _, vt = np.linalg.svd(kernels, full_matrices=False)  # independent: SVD of the data, not eig of K^T K
    top = vt[:15].T
    assert basis.shape == (121, 15)
    assert np.abs(basis.T @ basis - np.eye(15)).max() < 1e-5
    assert np.abs(basis @ basis.T - top @ top.T).max() < 1e-4  # same subspace
    assert np.abs(np.abs(np.sum(basis * top, axis=0)) - 1).max() < 1e-3  # same order: largest first


def test_pca_basis_is_seeded(basis):
    assert basis.shape == (441, 15) and basis.dtype == torch.float32
    first = kernel_pca_basis(seed=0, n_kernels=400, size=11)
    assert torch.equal(first, kernel_pca_basis(seed=0, n_kernels=400, size=11))
    assert not torch.equal(pca_kernel_population(0, 50), pca_kernel_population(1, 50))
    assert not torch.equal(first, kernel_pca_basis(seed=1, n_kernels=400, size=11))


def test_prior_vector_projects_kernels_and_appends_noise(basis):
    kernel = anisotropic_gaussian_kernel(torch.tensor([0.3, 2.0]), torch.tensor([1.0, 3.0]), torch.tensor([0.5, 2.0]))
    code = prior_vector(kernel, basis)
    assert code.shape == (2, 15)
    assert torch.allclose(code, kernel.reshape(2, -1) @ basis)
    with_noise = prior_vector(kernel, basis, torch.tensor([4.0, 17.5]))
    assert with_noise.shape == (2, 18)
    assert torch.equal(with_noise[:, :15], code)
    assert torch.equal(with_noise[:, 15:], torch.tensor([[4.0] * 3, [17.5] * 3]))


# ----------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("scale,high", [(2, 2.0), (3, 3.0), (4, 4.0)])
def test_setting1_sampler_draws_isotropic_sigmas_in_range(basis, scale, high):
    drawn = DegradationSampler(scale, 1, basis).sample(2000, _generator(scale))
    assert isinstance(drawn, Degradation) and len(drawn) == 2000
    sigma = drawn.lambda1
    assert sigma.min() >= 0.2 and sigma.max() <= high and sigma.max() > high - 0.05 and sigma.min() < 0.25
    assert torch.equal(drawn.lambda1, drawn.lambda2) and torch.all(drawn.noise_sigma == 0)
    assert (drawn.kernel - isotropic_gaussian_kernel(sigma)).abs().max() < 1e-6
    assert drawn.prior.shape == (2000, 15)
    assert torch.allclose(drawn.prior, prior_vector(drawn.kernel, basis))


def test_setting2_sampler_draws_anisotropic_kernels_and_noise(basis):
    drawn = DegradationSampler(4, 2, basis).sample(2000, _generator(11))
    for values, low, high in ((drawn.lambda1, 0.2, 4.0), (drawn.lambda2, 0.2, 4.0), (drawn.theta, 0.0, math.pi)):
        assert values.min() >= low and values.max() < high and values.max() > high - 0.05
    assert drawn.noise_sigma.min() >= 0 and drawn.noise_sigma.max() <= 25 and drawn.noise_sigma.mean() > 11
    rebuilt = anisotropic_gaussian_kernel(drawn.theta.double(), drawn.lambda1.double(), drawn.lambda2.double())
    assert (drawn.kernel - rebuilt).abs().max() < 1e-5
    assert drawn.prior.shape == (2000, 18)
    assert torch.equal(drawn.prior[:, 15:], drawn.noise_sigma.view(-1, 1).expand(-1, 3))


def test_sampler_is_deterministic_per_seed(basis):
    sampler = DegradationSampler(4, 2, basis)
    first, again, other = (sampler.sample(8, _generator(s)) for s in (5, 5, 6))
    assert torch.equal(first.kernel, again.kernel) and torch.equal(first.noise_sigma, again.noise_sigma)
    assert not torch.equal(first.kernel, other.kernel)


@pytest.mark.parametrize("setting", [1, 2])
def test_views_of_one_item_share_its_degradation(basis, setting):
    sampler = DegradationSampler(4, setting, basis)
    hr = torch.rand(3, 4, 3, 64, 64, generator=_generator(20 + setting))
    drawn = sampler.sample(3, _generator(30))
    lr = sampler.degrade_views(hr, drawn, _generator(31))
    assert lr.shape == (3, 4, 3, 16, 16)
    for b in range(3):
        alone = degrade(hr[b], drawn.kernel[b], 4)  # same kernel, no noise
        diff = ((lr[b] - alone) * 255.0).round()
        if setting == 1:
            assert diff.abs().max() <= 1 and (diff != 0).float().mean() < 0.005
        else:
            sigma = drawn.noise_sigma[b].item()
            assert diff.std().item() == pytest.approx(math.sqrt(sigma**2 + 1 / 6), rel=0.15, abs=0.3)


def test_degrade_views_is_seeded(basis):
    sampler = DegradationSampler(4, 2, basis)
    hr = torch.rand(2, 2, 3, 32, 32, generator=_generator(40))
    drawn = sampler.sample(2, _generator(41))
    first = sampler.degrade_views(hr, drawn, _generator(42))
    assert torch.equal(first, sampler.degrade_views(hr, drawn, _generator(42)))
    assert not torch.equal(first, sampler.degrade_views(hr, drawn, _generator(43)))


# ----------------------------------------------------------------------------- bad input


def test_bad_kernels_are_rejected_with_their_shape():
    hr = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\(1, 21, 20\)"):
        degrade(hr, torch.rand(1, 21, 20), 4)
    with pytest.raises(ValueError, match=r"\(1, 20, 20\)"):
        degrade(hr, torch.rand(1, 20, 20), 4)
    with pytest.raises(ValueError, match=r"size.*20"):
        isotropic_gaussian_kernel(1.0, size=20)


def test_negative_sigmas_are_rejected_with_their_value():
    with pytest.raises(ValueError, match=r"sigma.*-0\.5"):
        isotropic_gaussian_kernel(-0.5)
    with pytest.raises(ValueError, match=r"lambda2.*-1\.0"):
        anisotropic_gaussian_kernel(0.0, 1.0, -1.0)
    with pytest.raises(ValueError, match=r"noise_sigma.*-3\.0"):
        degrade(torch.rand(1, 3, 32, 32), isotropic_gaussian_kernel(1.0), 4, -3.0)


def test_bad_image_sizes_are_rejected_with_their_size(basis):
    kernel = isotropic_gaussian_kernel(1.0)
    with pytest.raises(ValueError, match="30x32"):
        degrade(torch.rand(1, 3, 30, 32), kernel, 4)
    with pytest.raises(ValueError, match="8x8"):
        degrade(torch.rand(1, 3, 8, 8), kernel, 4)  # too small for the 21x21 kernel's reflect pad
    with pytest.raises(ValueError, match="50x48"):
        bicubic_downsample(torch.rand(1, 3, 50, 48), 4)
    sampler = DegradationSampler(4, 1, basis)
    with pytest.raises(ValueError, match="66x64"):
        sampler.degrade_views(torch.rand(1, 2, 3, 66, 64), sampler.sample(1), None)
    with pytest.raises(ValueError, match="expected 2 degradations"):
        sampler.degrade_views(torch.rand(2, 2, 3, 64, 64), sampler.sample(1), None)
    with pytest.raises(ValueError, match=r"setting.*3"):
        DegradationSampler(4, 3, basis)
