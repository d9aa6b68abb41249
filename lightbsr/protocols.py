"""Evaluation protocols as data: which degradations a model is scored on, and the exact LR pixels.

* `iso_x4`: x4, isotropic sigma {1.2, 2.4, 3.6}, no noise (setting 1 table; DASR protocol).
* `aniso_x4`: x4, nine anisotropic kernels x noise sigma {5, 10} = 18 cases (setting 2 table).
* `gaussian8`: KDSR's Gaussian8, x4 isotropic sigma 1.8 .. 3.2 in steps of 0.2 (setting 1).

`make_lr` crops HR to a multiple of the scale (top-left, like the reference) and degrades it
with the training pipeline, on CPU; the noise is drawn from a generator seeded by a SHA-256 of
(protocol, case, image key), so every model, run and machine sees identical LR pixels.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from lightbsr.degrade import (
    KERNEL_SIZE,
    anisotropic_gaussian_kernel,
    degrade,
    isotropic_gaussian_kernel,
    prior_vector,
)

__all__ = ["PROTOCOLS", "DegradationCase", "Protocol", "case_seed", "crop_to_scale", "get_protocol"]


@dataclass(frozen=True)
class DegradationCase:
    """One test degradation: isotropic (sigma) or anisotropic (theta in degrees, lambda1, lambda2), + noise."""

    name: str
    sigma: float | None = None
    theta_deg: float | None = None
    lambda1: float | None = None
    lambda2: float | None = None
    noise_sigma: float = 0.0  # 0..255 scale

    @property
    def isotropic(self) -> bool:
        return self.sigma is not None

    def kernel(self) -> torch.Tensor:
        """(21, 21) float32 blur kernel."""
        if self.sigma is not None:
            return isotropic_gaussian_kernel(self.sigma, KERNEL_SIZE)[0]
        if self.theta_deg is None or self.lambda1 is None or self.lambda2 is None:
            raise ValueError(f"case {self.name!r}: expected sigma, or theta_deg, lambda1 and lambda2")
        theta = math.radians(self.theta_deg)
        return anisotropic_gaussian_kernel(theta, self.lambda1, self.lambda2, KERNEL_SIZE)[0]

    def prior(self, basis: torch.Tensor, with_noise: bool | None = None) -> torch.Tensor:
        """Teacher prior (15,), or (18,) with the noise sigma x3; with_noise defaults to `noise_sigma > 0`."""
        with_noise = self.noise_sigma > 0 if with_noise is None else with_noise
        noise = torch.tensor([self.noise_sigma]) if with_noise else None
        return prior_vector(self.kernel().unsqueeze(0), basis, noise)[0]


@dataclass(frozen=True)
class Protocol:
    """A named list of degradation cases at one scale, for one setting (1: 15-d prior, 2: 18-d)."""

    name: str
    scale: int
    setting: int
    cases: tuple[DegradationCase, ...]
    description: str = ""

    def case(self, name: str) -> DegradationCase:
        for case in self.cases:
            if case.name == name:
                return case
        known = ", ".join(c.name for c in self.cases)
        raise ValueError(f"protocol {self.name!r}: unknown case {name!r}; known cases: {known}")

    def prior(self, case: DegradationCase, basis: torch.Tensor) -> torch.Tensor:
        """The prior the teacher of this protocol's setting expects: (15,) or (18,)."""
        return case.prior(basis, with_noise=self.setting == 2)

    def make_lr(self, hr: torch.Tensor, case: DegradationCase, image_key: str) -> torch.Tensor:
        """HR (3, H, W) or (1, 3, H, W) in [0, 1] -> LR of the same rank, (H//s, W//s); deterministic."""
        return self.make_pair(hr, case, image_key)[1]

    def make_pair(self, hr: torch.Tensor, case: DegradationCase, image_key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(HR cropped to a multiple of the scale, LR), both with hr's rank; score SR against this HR."""
        if not isinstance(hr, torch.Tensor) or hr.dim() not in (3, 4) or hr.shape[-3] != 3:
            shape = tuple(hr.shape) if isinstance(hr, torch.Tensor) else type(hr).__name__
            raise ValueError(f"hr ({image_key}): expected a (3, H, W) or (1, 3, H, W) float tensor, got {shape}")
        batched = hr if hr.dim() == 4 else hr.unsqueeze(0)
        if batched.shape[0] != 1:
            raise ValueError(f"hr ({image_key}): make_lr degrades one image, got a batch of {batched.shape[0]}")
        cropped = crop_to_scale(batched, self.scale)
        # on CPU in float32 whatever hr's device: GPU kernels and RNGs would give other pixels
        generator = torch.Generator().manual_seed(case_seed(self.name, case.name, image_key))
        noise = torch.tensor([case.noise_sigma]) if case.noise_sigma > 0 else None
        lr = degrade(cropped.detach().cpu().float(), case.kernel().unsqueeze(0), self.scale, noise, generator)
        lr = lr.to(device=hr.device, dtype=hr.dtype)
        return (cropped, lr) if hr.dim() == 4 else (cropped[0], lr[0])


def case_seed(protocol: str, case: str, image_key: str) -> int:
    """Stable 63-bit seed from the protocol, case and image names (SHA-256, not Python's hash())."""
    digest = hashlib.sha256(f"{protocol}\x1f{case}\x1f{image_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def crop_to_scale(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """Crop (..., H, W) to (..., H - H % s, W - W % s) from the top-left corner."""
    height, width = hr.shape[-2:]
    if height < scale or width < scale:
        raise ValueError(f"hr: a {height}x{width} image is smaller than the scale {scale}")
    return hr[..., : height - height % scale, : width - width % scale]


def _iso_case(sigma: float) -> DegradationCase:
    return DegradationCase(name=f"sigma{sigma:.1f}", sigma=sigma)


def _aniso_case(theta_deg: float, lambda1: float, lambda2: float, noise: float) -> DegradationCase:
    name = f"t{theta_deg:g}_l{lambda1:.1f}_l{lambda2:.1f}_n{noise:g}"
    return DegradationCase(name=name, theta_deg=theta_deg, lambda1=lambda1, lambda2=lambda2, noise_sigma=noise)


#: (theta degrees, lambda1, lambda2) of the setting-2 table (spec section 4).
ANISO_KERNELS = (
    (0, 2.0, 0.5),
    (10, 2.0, 1.0),
    (30, 3.5, 1.5),
    (45, 3.5, 2.0),
    (90, 3.5, 2.0),
    (120, 4.0, 1.5),
    (135, 4.0, 2.0),
    (165, 4.0, 3.0),
    (180, 4.0, 4.0),
)
ANISO_NOISE = (5.0, 10.0)

PROTOCOLS: dict[str, Protocol] = {
    protocol.name: protocol
    for protocol in (
        Protocol("iso_x4", 4, 1, tuple(_iso_case(s) for s in (1.2, 2.4, 3.6)), "x4 isotropic Gaussian, no noise"),
        Protocol(
            "aniso_x4",
            4,
            2,
            tuple(_aniso_case(t, l1, l2, n) for n in ANISO_NOISE for t, l1, l2 in ANISO_KERNELS),
            "x4 nine anisotropic Gaussians x noise sigma {5, 10}",
        ),
        Protocol(
            "gaussian8",
            4,
            1,
            tuple(_iso_case(round(1.8 + 0.2 * i, 1)) for i in range(8)),
            "KDSR Gaussian8: x4 isotropic sigma 1.8..3.2 step 0.2",
        ),
    )
}


def get_protocol(name: str) -> Protocol:
    """The protocol registered under `name`, or a ValueError listing the known names."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown evaluation protocol {name!r}; known: {', '.join(sorted(PROTOCOLS))}") from None
