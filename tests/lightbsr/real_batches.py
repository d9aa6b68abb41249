"""Training examples cut from the real sample photographs and degraded with lightbsr.degrade.

Shared by the objective tests (plain PyTorch) and the Ray Train tests (an in-memory Ray Dataset
with the columns of the batch contract).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lightbsr.degrade import DegradationSampler, degrade, isotropic_gaussian_kernel
from lightbsr.images import read_rgb


def load_photos(folder: Path) -> list[torch.Tensor]:
    """Every PNG of the folder as float (3, H, W) in [0, 1], sorted by name."""
    return [torch.from_numpy(read_rgb(p)).permute(2, 0, 1).float() / 255 for p in sorted(Path(folder).glob("*.png"))]


def degraded_examples(
    folder: Path, n: int, views: int, patch: int, scale: int, basis: torch.Tensor, seed: int = 0
) -> dict[str, np.ndarray]:
    """n items of `views` random HR crops from one photo region, sharing one drawn degradation.

    Returns the batch contract: lr uint8 (n, V, 3, p, p), hr uint8 (n, V, 3, ps, ps), prior (n, 15),
    noise_sigma (n,), tile_id (n,).
    """
    photos = load_photos(folder)
    g = torch.Generator().manual_seed(seed)
    hr_side, region = patch * scale, 2 * patch * scale
    hr = torch.empty(n, views, 3, hr_side, hr_side)
    for i in range(n):
        photo = photos[int(torch.randint(len(photos), (1,), generator=g))]
        top = int(torch.randint(photo.shape[1] - region + 1, (1,), generator=g))
        left = int(torch.randint(photo.shape[2] - region + 1, (1,), generator=g))
        for v in range(views):
            y, x = (int(t) for t in torch.randint(region - hr_side + 1, (2,), generator=g))
            hr[i, v] = photo[:, top + y : top + y + hr_side, left + x : left + x + hr_side]
    sampler = DegradationSampler(scale, 1, basis)
    degradation = sampler.sample(n, g)
    lr = sampler.degrade_views(hr, degradation, g)
    return {
        "lr": (lr * 255).round().to(torch.uint8).numpy(),
        "hr": (hr * 255).round().to(torch.uint8).numpy(),
        "prior": degradation.prior.numpy().astype(np.float32),
        "noise_sigma": degradation.noise_sigma.numpy().astype(np.float32),
        "tile_id": np.arange(n, dtype=np.int64),
    }


def as_float_batch(examples: dict[str, np.ndarray], index: slice | np.ndarray) -> tuple[torch.Tensor, ...]:
    """(lr, hr, prior) float tensors for the given items, pixels divided by 255 as the loop does."""
    lr = torch.from_numpy(examples["lr"][index]).float() / 255
    hr = torch.from_numpy(examples["hr"][index]).float() / 255
    return lr, hr, torch.from_numpy(examples["prior"][index])


def blind_blur_eval_set(folder: Path, scale: int, hr_side: int, seed: int = 123) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre crops of the held-out photos, each blurred with its own sigma ~ U[0.2, 4] (blind)."""
    photos = load_photos(folder)
    hr = torch.stack(
        [
            p[:, (p.shape[1] - hr_side) // 2 :][:, :hr_side, (p.shape[2] - hr_side) // 2 :][:, :, :hr_side]
            for p in photos
        ]
    )
    g = torch.Generator().manual_seed(seed)
    sigma = 0.2 + 3.8 * torch.rand(len(photos), generator=g)
    lr = degrade(hr, isotropic_gaussian_kernel(sigma), scale)
    return lr, hr
