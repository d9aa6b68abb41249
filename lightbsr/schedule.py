"""The per-epoch learning-rate rule of the recipe (spec section 3), the authors' formula.

Epochs are **1-based**: epoch 1 is the first epoch, `schedule.epochs` the last. With the paper's
numbers (phase 1 = 100, warm-up = 5, epochs = 700, lr 2e-4, min 1e-6):
* epochs 1..100: lr (constant, phase 1);
* epochs 101..105: lr * (epoch - 100) / 5 (linear warm-up, reaches lr at 105);
* epochs 106..700: min_lr + (lr - min_lr) * (1 + cos(pi * (epoch - 105) / 595)) / 2 (min_lr at 700).
"""

from __future__ import annotations

import math
from typing import Protocol

__all__ = ["learning_rate", "phase_of"]


class Schedule(Protocol):
    epochs: int
    phase1_epochs: int
    warmup_epochs: int
    lr: float
    min_lr: float


def _check_epoch(epoch: int, schedule: Schedule) -> None:
    if not 1 <= epoch <= schedule.epochs:
        raise ValueError(f"epoch {epoch} is outside 1..{schedule.epochs} (epochs are 1-based)")


def phase_of(epoch: int, schedule: Schedule) -> int:
    """1 for the representation-only phase, 2 once reconstruction is trained."""
    _check_epoch(epoch, schedule)
    return 1 if epoch <= schedule.phase1_epochs else 2


def learning_rate(epoch: int, schedule: Schedule) -> float:
    _check_epoch(epoch, schedule)
    phase1, warmup = schedule.phase1_epochs, schedule.warmup_epochs
    if epoch <= phase1:
        return schedule.lr
    if epoch <= phase1 + warmup:
        return schedule.lr * (epoch - phase1) / warmup
    cosine_epochs = schedule.epochs - phase1 - warmup
    progress = (epoch - phase1 - warmup) / cosine_epochs
    return schedule.min_lr + (schedule.lr - schedule.min_lr) * (1 + math.cos(math.pi * progress)) / 2
