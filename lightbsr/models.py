"""The shape of a LightBSR model and the one builder of untrained teachers and students.

`ModelSpec` is the one source of the model defaults (the paper's: 8 groups of 8 blocks, a MoCo
queue of 8192 keys with momentum 0.999): checkpoints complete their `model_config` from it and
`workflows.config.ModelConfig` takes its defaults from it. This module imports torch only when a
model is built, so the config can read the defaults without loading torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from lightbsr.student import Student
    from lightbsr.teacher import Teacher

__all__ = ["ROLES", "ModelSpec", "Role", "build_model", "spec_keys"]

Role = Literal["teacher", "student"]
ROLES: tuple[Role, ...] = ("teacher", "student")


@dataclass(frozen=True)
class ModelSpec:
    """Everything that fixes a network's shape (and the PCA basis its prior is coded in)."""

    scale: int = 4
    setting: int = 1  # 1: isotropic blur, prior = 15-d kernel code; 2: + anisotropic and noise, 18-d
    n_groups: int = 8  # groups in the generator body
    n_blocks: int = 8  # adaptation blocks per group
    queue_size: int = 8192  # MoCo queue length of the teacher
    momentum: float = 0.999  # MoCo key-encoder momentum
    pca_seed: int = 0  # seed of the kernel PCA basis (saved with checkpoints)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ModelSpec:
        """A spec from a `model_config` dict; missing keys take the defaults, unknown keys are a TypeError."""
        return cls(**dict(values))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def spec_keys() -> tuple[str, ...]:
    """The keys of a `model_config`, in order."""
    return tuple(f.name for f in fields(ModelSpec))


def build_model(role: Role | str, spec: ModelSpec | Mapping[str, Any]) -> Student | Teacher:
    """An untrained network of the given role and shape (the student ignores the teacher-only fields)."""
    from lightbsr.student import Student
    from lightbsr.teacher import Teacher

    if not isinstance(spec, ModelSpec):
        spec = ModelSpec.from_mapping(spec)
    if role == "student":
        return Student(scale=spec.scale, n_groups=spec.n_groups, n_blocks=spec.n_blocks)
    if role == "teacher":
        return Teacher(
            scale=spec.scale,
            setting=spec.setting,
            n_groups=spec.n_groups,
            n_blocks=spec.n_blocks,
            queue_size=spec.queue_size,
            momentum=spec.momentum,
        )
    raise ValueError(f"role: expected 'student' or 'teacher', got {role!r}")
