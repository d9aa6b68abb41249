"""The LightBSR training losses (spec section 3), in the forms of the authors' code.

* `l1_255`: reconstruction L1 on the 0..255 scale (mean absolute error of 255*SR vs 255*HR).
* `contrastive_loss`: MoCo InfoNCE averaged over the V*(V-1) ordered pairs of views (i != j) with
  query q_i, positive key k_j (same image, same degradation) and the queue as negatives.
* `channel_distillation_loss`: KL(softmax(ca_T/T) || softmax(ca_S/T)) with batchmean reduction
  (no T^2 factor, as in the reference) plus a weighted L1 between the channel codes.
* `spatial_distillation_loss`: MSE between the spatial codes.
Teacher targets are detached: gradients only flow into the student.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["channel_distillation_loss", "contrastive_loss", "l1_255", "spatial_distillation_loss"]


def _same_shape(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} {tuple(a.shape)} and {names[1]} {tuple(b.shape)} must have the same shape")


def l1_255(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Mean |255*sr - 255*hr| for images in [0, 1]."""
    _same_shape(sr, hr, ("sr", "hr"))
    return F.l1_loss(sr.float() * 255.0, hr.float() * 255.0)


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE over ordered view pairs.

    q, k: (B, V, D) L2-normalised queries and keys; queue: (D, K) negatives. For every pair i != j
    the logits of item b are [q_bi . k_bj, q_bi . queue] / T and the target is index 0; the result is
    the mean over items and pairs (the reference sums per-pair batch means and divides by V(V-1)).
    """
    if q.dim() != 3 or q.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must both be (B, V, D)")
    if q.shape[1] < 2:
        raise ValueError(f"contrastive_loss needs at least 2 views, got V={q.shape[1]}")
    if queue.dim() != 2 or queue.shape[0] != q.shape[2]:
        raise ValueError(f"queue {tuple(queue.shape)} must be (D={q.shape[2]}, K)")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    q, k, queue = q.float(), k.float().detach(), queue.float().detach()
    views = q.shape[1]
    positive = torch.einsum("bid,bjd->bij", q, k) / temperature  # (B, V, V): q_i . k_j
    negative = torch.einsum("bid,dn->bin", q, queue) / temperature  # (B, V, K)
    negative_lse = torch.logsumexp(negative, dim=2, keepdim=True)  # (B, V, 1)
    # cross-entropy with target 0 = logsumexp([pos, neg]) - pos
    per_pair = torch.logaddexp(positive, negative_lse) - positive  # (B, V, V)
    off_diagonal = ~torch.eye(views, dtype=torch.bool, device=q.device)
    return per_pair[:, off_diagonal].mean()


def channel_distillation_loss(
    ca_s: torch.Tensor,
    ca_t: torch.Tensor,
    temperature: float = 0.15,
    l1_weight: float = 0.1,
    kl_weight: float = 1.0,
) -> torch.Tensor:
    """kl_weight * KL(softmax(ca_t/T) || softmax(ca_s/T)) (batchmean) + l1_weight * L1(ca_s, ca_t); ca: (B, C)."""
    _same_shape(ca_s, ca_t, ("ca_s", "ca_t"))
    if ca_s.dim() != 2:
        raise ValueError(f"channel codes must be (B, C), got {tuple(ca_s.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    ca_s, ca_t = ca_s.float(), ca_t.float().detach()
    student_log_p = F.log_softmax(ca_s / temperature, dim=1)
    teacher_p = F.softmax(ca_t / temperature, dim=1)
    kl = F.kl_div(student_log_p, teacher_p, reduction="batchmean")
    return kl_weight * kl + l1_weight * F.l1_loss(ca_s, ca_t)


def spatial_distillation_loss(xk_s: torch.Tensor, xk_t: torch.Tensor) -> torch.Tensor:
    """Mean squared error between spatial codes (B, 8, H, W)."""
    _same_shape(xk_s, xk_t, ("xk_s", "xk_t"))
    return F.mse_loss(xk_s.float(), xk_t.float().detach())
