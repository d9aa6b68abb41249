"""Evaluation protocols: the published case lists, deterministic LR pixels, clear errors."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lightbsr.degrade import degrade, kernel_pca_basis
from lightbsr.protocols import PROTOCOLS, case_seed, crop_to_scale, get_protocol

pytestmark = pytest.mark.unit

SPEC_ANISO_KERNELS = [
    (0, 2.0, 0.5), (10, 2.0, 1.0), (30, 3.5, 1.5), (45, 3.5, 2.0), (90, 3.5, 2.0),
    (120, 4.0, 1.5), (135, 4.0, 2.0), (165, 4.0, 3.0), (180, 4.0, 4.0),
]  # fmt: skip


@pytest.fixture(scope="module")
def basis() -> torch.Tensor:
    return kernel_pca_basis(seed=0, n_kernels=1000)


def _hr(seed: int, height: int = 50, width: int = 61) -> torch.Tensor:
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed))


def test_registry_holds_the_published_protocols():
    assert set(PROTOCOLS) == {"iso_x4", "aniso_x4", "gaussian8"}
    iso, aniso, g8 = (get_protocol(n) for n in ("iso_x4", "aniso_x4", "gaussian8"))
    assert (iso.scale, aniso.scale, g8.scale) == (4, 4, 4)
    assert [c.sigma for c in iso.cases] == [1.2, 2.4, 3.6]
    assert all(c.noise_sigma == 0 for c in iso.cases + g8.cases)
    assert [c.sigma for c in g8.cases] == pytest.approx([1.8 + 0.2 * i for i in range(8)])
    assert len(aniso.cases) == 18
    drawn = {(c.theta_deg, c.lambda1, c.lambda2, c.noise_sigma) for c in aniso.cases}
    assert drawn == {(t, l1, l2, n) for t, l1, l2 in SPEC_ANISO_KERNELS for n in (5.0, 10.0)}
    for protocol in PROTOCOLS.values():
        names = [c.name for c in protocol.cases]
        assert len(set(names)) == len(names)


def _gaussian_by_numpy(covariance: np.ndarray, size: int = 21) -> np.ndarray:
    """exp(-x^T C^-1 x / 2) on a size x size grid centred on the middle tap, x = (column, row), normalised."""
    offsets = np.arange(size) - size // 2
    cols, rows = np.meshgrid(offsets, offsets)  # (size, size): column offset, row offset
    points = np.stack([cols, rows], axis=-1).astype(np.float64)
    density = np.exp(-0.5 * np.einsum("...i,ij,...j->...", points, np.linalg.inv(covariance), points))
    return density / density.sum()


def test_case_kernels_are_the_gaussians_of_their_parameters():
    theta = math.radians(30)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    covariance = rotation @ np.diag([3.5**2, 1.5**2]) @ rotation.T
    aniso = get_protocol("aniso_x4").case("t30_l3.5_l1.5_n5").kernel()
    assert aniso.shape == (21, 21) and aniso.dtype == torch.float32
    np.testing.assert_allclose(aniso.numpy(), _gaussian_by_numpy(covariance), atol=1e-7)
    iso = get_protocol("iso_x4").case("sigma2.4").kernel()
    np.testing.assert_allclose(iso.numpy(), _gaussian_by_numpy(np.eye(2) * 2.4**2), atol=1e-7)


def test_case_kernel_matches_reference_vector(parity_vectors):
    reference = parity_vectors["degradation"]["kernel_aniso_t30_l3.5_l1.5"][0]
    assert (get_protocol("aniso_x4").case("t30_l3.5_l1.5_n10").kernel() - reference).abs().max() <= 1e-6


def test_priors_have_the_width_of_the_setting(basis):
    iso, aniso = get_protocol("iso_x4"), get_protocol("aniso_x4")
    iso_prior = iso.prior(iso.cases[0], basis)
    assert iso_prior.shape == (15,)
    assert torch.allclose(iso_prior, iso.cases[0].kernel().reshape(-1) @ basis)
    case = aniso.case("t45_l3.5_l2.0_n10")
    assert case.prior(basis).shape == (18,)
    assert torch.equal(aniso.prior(case, basis)[15:], torch.tensor([10.0, 10.0, 10.0]))


def test_make_pair_crops_to_the_scale_and_gives_the_reference_lr(parity_vectors):
    """The authors' pipeline made `lr_x4_iso_s1.2` from the 48x60 `hr`; pad that HR to 50x61 and
    the protocol must crop it back (top-left) and give the same LR pixels."""
    vectors = parity_vectors["degradation"]
    hr = vectors["hr"][0] / 255.0  # (3, 48, 60)
    extra = torch.rand(3, 50, 61, generator=torch.Generator().manual_seed(0))
    padded = torch.cat([torch.cat([hr, extra[:, 48:, :60]], dim=1), extra[:, :, 60:]], dim=2)  # (3, 50, 61)
    protocol = get_protocol("iso_x4")
    cropped, lr = protocol.make_pair(padded, protocol.case("sigma1.2"), "img")
    assert torch.equal(cropped, hr)
    levels = ((lr - vectors["lr_x4_iso_s1.2"][0]) * 255.0).round().abs()
    assert lr.shape == (3, 12, 15) and levels.max() <= 1  # off by one level only on rounding boundaries
    assert (levels > 0).float().mean() < 0.01
    assert torch.equal(protocol.make_lr(padded[None], protocol.case("sigma1.2"), "img"), lr[None])


def test_make_lr_is_deterministic_per_image_and_case():
    protocol = get_protocol("aniso_x4")
    case = protocol.case("t0_l2.0_l0.5_n10")
    hr = _hr(1)
    first = protocol.make_lr(hr, case, "B100/3096.png")
    assert torch.equal(first, protocol.make_lr(hr.clone(), case, "B100/3096.png"))
    assert not torch.equal(first, protocol.make_lr(hr, case, "B100/8023.png"))
    noise_free = degrade(crop_to_scale(hr[None], 4), case.kernel(), 4)[0]
    residual = (first - noise_free) * 255.0
    assert residual.std().item() == pytest.approx(10.0, rel=0.2)


def test_case_seed_does_not_depend_on_python_hash_randomisation():
    code = "from lightbsr.protocols import case_seed; print(case_seed('aniso_x4', 't0_l2.0_l0.5_n5', 'Set5/bird.png'))"
    seeds = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for hash_seed in ("1", "2")
    }
    assert seeds == {str(case_seed("aniso_x4", "t0_l2.0_l0.5_n5", "Set5/bird.png"))}
    assert case_seed("aniso_x4", "a", "b") != case_seed("aniso_x4", "a", "c")
    assert 0 <= case_seed("p", "c", "k") < 2**63


def test_unknown_names_and_bad_images_are_rejected():
    with pytest.raises(ValueError, match="aniso_x4, gaussian8, iso_x4"):
        get_protocol("iso_x3")
    with pytest.raises(ValueError, match=r"sigma9\.9.*sigma1\.2"):
        get_protocol("iso_x4").case("sigma9.9")
    protocol = get_protocol("iso_x4")
    with pytest.raises(ValueError, match=r"3x3.*scale 4"):
        crop_to_scale(torch.rand(3, 3, 3), 4)
    with pytest.raises(ValueError, match=r"tiny\.png"):
        protocol.make_lr(torch.rand(1, 64, 64), protocol.cases[0], "tiny.png")
