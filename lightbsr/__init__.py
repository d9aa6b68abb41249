"""LightBSR blind super-resolution (ICCV 2025): networks, degradations, losses and metrics in pure PyTorch."""

from lightbsr.student import Student
from lightbsr.teacher import Teacher

__all__ = ["Student", "Teacher"]
