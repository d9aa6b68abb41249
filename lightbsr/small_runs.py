"""Small training runs on real photographs, in plain PyTorch: teacher, then student, then Y-PSNR.

Shared by the claims study (`benchmarks/claims_study.py`) and the test that training works
(`tests/lightbsr/test_objectives.py`), and the source of the degraded examples the objective and
Ray Train tests use. The recipe is the paper's (two phases for each network, the student starts
from the teacher and is aligned to it) at CPU scale: small networks, small patches, few steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lightbsr.degrade import DegradationSampler, degrade, isotropic_gaussian_kernel
from lightbsr.images import read_rgb
from lightbsr.metrics import psnr
from lightbsr.objectives import StudentObjective, TeacherObjective
from lightbsr.student import Student
from lightbsr.teacher import Teacher

__all__ = [
    "Recipe",
    "as_float_batch",
    "bicubic_psnr",
    "blind_blur_eval_set",
    "degraded_examples",
    "load_photos",
    "paper_losses",
    "student_psnr",
    "train_student",
    "train_teacher",
]


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


@dataclass
class LossWeights:
    """The paper's loss settings (the fields of `workflows.config.LossConfig`)."""

    l1_weight: float = 1.0
    contrastive_temperature: float = 0.07
    contrastive_weight: float = 1.0
    kd_temperature: float = 0.15
    channel_kl_weight: float = 1.0
    channel_l1_weight: float = 0.1
    spatial_weight: float = 1.0
    distillation: bool = True


def paper_losses(distillation: bool = True) -> LossWeights:
    return LossWeights(distillation=distillation)


@dataclass(frozen=True)
class Recipe:
    """Sizes and step counts of one small run (each network: phase-1 steps, then phase-2 steps)."""

    scale: int = 4
    n_groups: int = 2
    n_blocks: int = 2
    batch: int = 8
    lr: float = 2e-3  # Adam, constant
    queue_size: int = 256  # the teacher's MoCo queue and momentum, scaled down with the run
    momentum: float = 0.99
    teacher_phase1: int = 60
    teacher_phase2: int = 120
    student_phase1: int = 30
    student_phase2: int = 150


def _adam(objective: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    return torch.optim.Adam([p for p in objective.parameters() if p.requires_grad], recipe.lr, betas=(0.9, 0.99))


def _fit(
    objective: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    examples: dict[str, np.ndarray],
    phases: list[int],
    batch: int,
    first_step: int = 0,
) -> None:
    """One Adam step per entry of `phases` (the phase of that step), cycling through the examples."""
    objective.train()
    n = len(examples["lr"])
    for step, phase in enumerate(phases, start=first_step):
        start = (step * batch) % n
        lr, hr, prior = as_float_batch(examples, slice(start, start + batch))
        terms = objective(lr, hr, prior, phase=phase)
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()


def train_teacher(
    examples: dict[str, np.ndarray],
    recipe: Recipe,
    seed: int,
    use_prior: bool = True,
    after_phase1: Callable[[Teacher], None] | None = None,
) -> Teacher:
    """A teacher trained on multi-view examples; `use_prior=False` feeds zeros for the prior (plain contrastive).

    `after_phase1(teacher)` is called (teacher in eval mode) between the phases.
    """
    torch.manual_seed(seed)
    teacher = Teacher(recipe.scale, 1, recipe.n_groups, recipe.n_blocks, recipe.queue_size, recipe.momentum)
    if not use_prior:
        examples = {**examples, "prior": np.zeros_like(examples["prior"])}
    objective = TeacherObjective(teacher, paper_losses())
    optimizer = _adam(objective, recipe)
    _fit(objective, optimizer, examples, [1] * recipe.teacher_phase1, recipe.batch)
    if after_phase1 is not None:
        after_phase1(teacher.eval())
    _fit(objective, optimizer, examples, [2] * recipe.teacher_phase2, recipe.batch, recipe.teacher_phase1)
    return teacher.eval()


def train_student(
    examples: dict[str, np.ndarray], teacher: Teacher, recipe: Recipe, seed: int, aligned: bool
) -> Student:
    """A student initialised from the teacher; aligned: phase 1 + phase 2 with distillation, else the same
    number of steps of phase 2 with L1 only. Examples: view 0 of each item is used."""
    torch.manual_seed(seed)
    student = Student(recipe.scale, recipe.n_groups, recipe.n_blocks)
    student.load_from_teacher(teacher)
    steps = recipe.student_phase1 + recipe.student_phase2
    phases = [1] * recipe.student_phase1 + [2] * recipe.student_phase2 if aligned else [2] * steps
    objective = StudentObjective(student, teacher if aligned else None, paper_losses(distillation=aligned))
    _fit(objective, _adam(objective, recipe), examples, phases, recipe.batch)
    return student.eval()


@torch.no_grad()
def student_psnr(student: Student, lr: torch.Tensor, hr: torch.Tensor, scale: int) -> torch.Tensor:
    """Y-PSNR (dB) per image of the student's SR against HR."""
    return psnr(student.eval()(lr).clamp(0, 1), hr, scale)


def bicubic_psnr(lr: torch.Tensor, hr: torch.Tensor, scale: int) -> torch.Tensor:
    """Y-PSNR (dB) per image of bicubic enlargement against HR."""
    return psnr(F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1), hr, scale)
