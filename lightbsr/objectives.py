"""Training objectives: one batch in, a dict of loss terms out (the `total` is what is minimised).

All trainable compute happens inside `forward`, so a data-parallel wrapper (DDP) can wrap the
objective as a whole; the training loop is the same for both stages. Batches follow the batch
contract after the loop has divided by 255: `lr` (B, V, 3, h, w), `hr` (B, V, 3, sh, sw) in [0, 1],
`prior` (B, P). The teacher needs V >= 2 views that share one degradation; the student uses view 0.

`loss_cfg` is any object with the fields of `workflows.config.LossConfig` (l1_weight,
contrastive_temperature, contrastive_weight, kd_temperature, channel_kl_weight, channel_l1_weight,
spatial_weight, distillation).
"""

from __future__ import annotations

from typing import Any, Protocol, Self

import torch
import torch.distributed as dist
from torch import nn

from lightbsr.losses import channel_distillation_loss, contrastive_loss, l1_255, spatial_distillation_loss
from lightbsr.student import Student
from lightbsr.teacher import Teacher

__all__ = ["LossSettings", "StudentObjective", "TeacherObjective"]

Terms = dict[str, torch.Tensor]


class LossSettings(Protocol):
    l1_weight: float
    contrastive_temperature: float
    contrastive_weight: float
    kd_temperature: float
    channel_kl_weight: float
    channel_l1_weight: float
    spatial_weight: float
    distillation: bool


def _check_batch(lr: torch.Tensor, hr: torch.Tensor, prior: torch.Tensor) -> None:
    if lr.dim() != 5 or hr.dim() != 5 or lr.shape[:3] != hr.shape[:3]:
        raise ValueError(f"lr {tuple(lr.shape)} and hr {tuple(hr.shape)} must be (B, V, 3, h, w) and (B, V, 3, sh, sw)")
    if prior.dim() != 2 or prior.shape[0] != lr.shape[0]:
        raise ValueError(f"prior {tuple(prior.shape)} must be (B={lr.shape[0]}, P)")


def _size(lr: torch.Tensor) -> tuple[int, int]:
    """(h, w) of a (B, V, 3, h, w) batch."""
    return lr.shape[-2], lr.shape[-1]


def _check_phase(phase: int) -> None:
    if phase not in (1, 2):
        raise ValueError(f"phase must be 1 or 2, got {phase!r}")


@torch.no_grad()
def gather_from_all_workers(x: torch.Tensor) -> torch.Tensor:
    """(N, D) on each worker -> (world * N, D) in rank order on every worker (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class TeacherObjective(nn.Module):
    """Phase 1: contrastive; phase 2: L1 (0..255) + contrastive. Enqueues view 0's keys of all workers.

    The step is the authors' MoCo step (`moco/builder.py`): the query encoder runs once per view, so
    BatchNorm normalises each view with the statistics of its own B items (SyncBatchNorm: of that
    view on all workers), then once more over view 0 for the generator; the momentum update follows,
    then the key encoder runs once per view. Here each encoder runs once over all B*V crops (item-major
    rows, as `lr` holds them) with BatchNorm statistics per view: the convolutions are per item, so
    this gives the per-view calls' numbers in one pass. The query encoder runs in NCHW
    (`DegradationEncoder.forward` with `views`), the gradient-free key encoder in channels_last
    (`DegradationEncoder.forward_views_no_grad`, faster on CPU). The generator reuses view 0's
    query output (same input, weights and batch statistics as the authors' separate view-0 pass: the
    same numbers and gradient); each BatchNorm repeats view 0's running-statistics update, as that
    fifth pass leaves them.

    On CPU, when one view holds at least `PER_VIEW_CALLS_MIN_PIXELS` pixels (B * h * w), each encoder is
    called once per view instead, as the authors do (the same numbers; the running statistics are updated
    by those calls in the same order, the view-0 repeat by a gradient-free fifth query call): at that size
    the separate calls are the faster equal step.
    """

    # Measured on 2 CPU threads, step time / the pre-issue-13 joint pass, wall / CPU (benchmarks/teacher_step.py):
    # B=8, LR 24x24 (4608 pixels a view; benchmarks/results/teacher_step.md): batched 1.14 / 1.19, per-view calls
    # 1.49 / 1.56; B=32, LR 48x48 (73728; teacher_step_B32_V4_LR48.md): batched 1.30 / 1.28, per-view calls
    # 1.13 / 1.03. The switch sits near the geometric middle of the two sizes.
    PER_VIEW_CALLS_MIN_PIXELS = 16384

    def __init__(self, teacher: Teacher, loss_cfg: LossSettings) -> None:
        super().__init__()
        self.model = teacher
        self.loss_cfg = loss_cfg

    def forward(self, lr: torch.Tensor, hr: torch.Tensor, prior: torch.Tensor, phase: int) -> Terms:
        _check_batch(lr, hr, prior)
        _check_phase(phase)
        teacher, cfg = self.model, self.loss_cfg
        batch, views = lr.shape[:2]
        if views < 2:
            raise ValueError(f"the teacher needs at least 2 views per item, got V={views}")
        pixels = batch * lr.shape[-2] * lr.shape[-1]
        if lr.device.type == "cpu" and pixels >= self.PER_VIEW_CALLS_MIN_PIXELS:
            idr0, q, k = self._per_view_calls(lr, prior)
        else:
            idr0, q, k = self._batched_pass(lr, prior)
        contrastive = contrastive_loss(q, k, teacher.queue.clone(), cfg.contrastive_temperature)
        terms: Terms = {"contrastive": contrastive}
        total = cfg.contrastive_weight * contrastive
        if phase == 2:
            ca, xk = teacher.generator.convert(idr0, _size(lr))
            sr = teacher.generator.reconstruct(lr[:, 0], ca, xk)
            terms["l1"] = l1_255(sr, hr[:, 0])
            total = total + cfg.l1_weight * terms["l1"]
        teacher.enqueue(gather_from_all_workers(k[:, 0].contiguous()))
        terms["total"] = total
        return terms

    def _batched_pass(self, lr: torch.Tensor, prior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """View 0's IDR (B, 128, h/4, w/4), q and k (B, V, 128): each encoder once over all B*V crops."""
        teacher = self.model
        batch, views = lr.shape[:2]
        # item-major (B*V, 3 + P, h, w): row b * V + v is view v of item b, as lr holds them
        x = teacher.encoder_input(lr.flatten(0, 1), prior.repeat_interleave(views, dim=0))
        idr = teacher.encoder(x, views=views, repeat_first_view=True, by_item=True)  # (B*V, 128, h/4, w/4)
        q = teacher.head(idr).view(batch, views, -1)
        teacher.momentum_update()
        with torch.no_grad():
            k = teacher.key_head(teacher.key_encoder.forward_views_no_grad(x, views)).view(batch, views, -1).float()
        return idr.view(batch, views, *idr.shape[1:])[:, 0], q, k

    def _per_view_calls(self, lr: torch.Tensor, prior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As `_batched_pass`, each encoder called once per view in view order, as the authors do."""
        teacher = self.model
        inputs = [teacher.encoder_input(lr[:, v], prior) for v in range(lr.shape[1])]
        idr = [teacher.encoder(x) for x in inputs]
        q = torch.stack([teacher.head(view) for view in idr], dim=1)
        if teacher.encoder.training:
            with torch.no_grad():  # the authors' separate view-0 pass: its running-statistics update
                teacher.encoder(inputs[0])
        teacher.momentum_update()
        with torch.no_grad():
            k = torch.stack([teacher.key_head(teacher.key_encoder(x)) for x in inputs], dim=1).float()
        return idr[0], q, k

    @torch.no_grad()
    def super_resolve(self, lr: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """SR of (B, 3, h, w) LR images given their true priors (validation, image strips)."""
        return self.model(lr, prior)


class StudentObjective(nn.Module):
    """Phase 1: L_ch + L_sp; phase 2: L1 + L_ch + L_sp, aligned on a frozen teacher fed the true prior.

    The frozen teacher is held beside the module tree, not in it: its parameters, buffers and
    state_dict are not the objective's, so a data-parallel wrapper neither synchronises nor
    broadcasts it and checkpoints of the objective leave it out. `to()` moves it with the objective;
    it stays in eval mode and without gradients whatever `train()` is called with.
    """

    def __init__(self, student: Student, teacher: Teacher | None, loss_cfg: LossSettings) -> None:
        super().__init__()
        if loss_cfg.distillation and teacher is None:
            raise ValueError("distillation needs a teacher (loss.distillation is on but no teacher was given)")
        self.model = student
        self.loss_cfg = loss_cfg
        # a tuple is not registered by nn.Module: the teacher stays outside parameters()/state_dict()
        self._frozen: tuple[Teacher, ...] = (teacher.requires_grad_(False).eval(),) if teacher is not None else ()

    @property
    def teacher(self) -> Teacher | None:
        """The frozen teacher (not a submodule), or None without distillation."""
        return self._frozen[0] if self._frozen else None

    def to(self, *args: Any, **kwargs: Any) -> Self:
        """As `nn.Module.to`, moving the frozen teacher too."""
        for teacher in self._frozen:
            teacher.to(*args, **kwargs)
        return super().to(*args, **kwargs)

    def forward(self, lr: torch.Tensor, hr: torch.Tensor, prior: torch.Tensor, phase: int) -> Terms:
        _check_batch(lr, hr, prior)
        _check_phase(phase)
        student, cfg = self.model, self.loss_cfg
        if phase == 1 and not cfg.distillation:
            raise ValueError("phase 1 without distillation trains nothing: set schedule.phase1_epochs=0")
        lr0, size = lr[:, 0], _size(lr)  # (B, 3, h, w)
        ca, xk = student.generator.convert(student.encode(lr0), size)  # (B, 48), (B, 8, h, w)
        terms: Terms = {}
        total = torch.zeros((), device=lr.device)
        if cfg.distillation:
            (teacher,) = self._frozen
            with torch.no_grad():
                ca_t, xk_t = teacher.generator.convert(teacher.encode(lr0, prior), size)
            terms["channel"] = channel_distillation_loss(
                ca, ca_t, cfg.kd_temperature, cfg.channel_l1_weight, cfg.channel_kl_weight
            )
            terms["spatial"] = spatial_distillation_loss(xk, xk_t)
            total = total + terms["channel"] + cfg.spatial_weight * terms["spatial"]
        if phase == 2:
            sr = student.generator.reconstruct(lr0, ca, xk)
            terms["l1"] = l1_255(sr, hr[:, 0])
            total = total + cfg.l1_weight * terms["l1"]
        terms["total"] = total
        return terms

    @torch.no_grad()
    def super_resolve(self, lr: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """SR of (B, 3, h, w) LR images; the student ignores the prior (it is blind)."""
        return self.model(lr)
