"""The losses against plain, independent formulas (loops, explicit sums)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightbsr.losses import channel_distillation_loss, contrastive_loss, l1_255, spatial_distillation_loss

pytestmark = pytest.mark.unit


def _normalised(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).float()


def _info_nce_by_loop(q, k, queue, temperature):
    """Sum over ordered pairs (i != j) and items of -log softmax(logits)[0], then the mean."""
    batch, views, _ = q.shape
    total, count = 0.0, 0
    for i in range(views):
        for j in range(views):
            if i == j:
                continue
            for b in range(batch):
                logits = [float(q[b, i] @ k[b, j]) / temperature]
                logits += [float(q[b, i] @ queue[:, n]) / temperature for n in range(queue.shape[1])]
                top = max(logits)
                log_norm = top + math.log(sum(math.exp(x - top) for x in logits))
                total += log_norm - logits[0]
                count += 1
    return total / count


def test_contrastive_loss_matches_looped_infonce_over_ordered_view_pairs():
    q, k = _normalised(3, 4, 8, seed=0), _normalised(3, 4, 8, seed=1)
    queue = _normalised(16, 8, seed=2).T.contiguous()
    got = contrastive_loss(q, k, queue, temperature=0.07)
    assert got.item() == pytest.approx(_info_nce_by_loop(q, k, queue, 0.07), rel=1e-5)


def test_contrastive_loss_is_near_log_queue_size_for_unrelated_keys():
    # every logit ~0 -> CE = log(K + 1): the "starts near ln(8193)" of the spec
    q = torch.zeros(2, 4, 8)
    q[..., 0] = 1.0
    k = torch.zeros(2, 4, 8)
    k[..., 1] = 1.0
    queue = torch.zeros(8, 63)
    queue[2] = 1.0
    assert contrastive_loss(q, k, queue, 0.07).item() == pytest.approx(math.log(64), rel=1e-6)


def test_contrastive_loss_falls_when_positives_align():
    q = _normalised(4, 4, 16, seed=3)
    queue = _normalised(32, 16, seed=4).T.contiguous()
    unrelated = contrastive_loss(q, _normalised(4, 4, 16, seed=5), queue, 0.07)
    aligned = contrastive_loss(q, q.clone(), queue, 0.07)
    assert aligned < unrelated


def test_contrastive_loss_sends_no_gradient_into_keys_or_queue():
    q = _normalised(2, 3, 8, seed=6).requires_grad_()
    k = _normalised(2, 3, 8, seed=7).requires_grad_()
    queue = _normalised(5, 8, seed=8).T.contiguous().requires_grad_()
    contrastive_loss(q, k, queue, 0.1).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None and queue.grad is None


@pytest.mark.parametrize(
    "q_shape, k_shape, queue_shape",
    [((2, 4, 8), (2, 3, 8), (8, 5)), ((2, 1, 8), (2, 1, 8), (8, 5)), ((2, 4, 8), (2, 4, 8), (7, 5))],
)
def test_contrastive_loss_rejects_mismatched_shapes(q_shape, k_shape, queue_shape):
    with pytest.raises(ValueError):
        contrastive_loss(torch.zeros(q_shape), torch.zeros(k_shape), torch.zeros(queue_shape), 0.07)


def test_l1_is_on_the_0_to_255_scale():
    sr = torch.full((1, 3, 2, 2), 0.5)
    hr = torch.full((1, 3, 2, 2), 0.25)
    assert l1_255(sr, hr).item() == pytest.approx(255 * 0.25)


def test_channel_distillation_matches_explicit_kl_and_l1():
    g = torch.Generator().manual_seed(9)
    ca_s, ca_t = torch.randn(3, 48, generator=g), torch.randn(3, 48, generator=g)
    temperature, l1_weight = 0.15, 0.1
    expected = 0.0
    for b in range(3):
        p_t = torch.exp(ca_t[b] / temperature) / torch.exp(ca_t[b] / temperature).sum()
        p_s = torch.exp(ca_s[b] / temperature) / torch.exp(ca_s[b] / temperature).sum()
        expected += float((p_t * (p_t.log() - p_s.log())).sum()) / 3  # batchmean
    expected += l1_weight * float((ca_s - ca_t).abs().mean())
    got = channel_distillation_loss(ca_s, ca_t, temperature, l1_weight)
    assert got.item() == pytest.approx(expected, rel=1e-4)


def test_channel_distillation_is_zero_for_identical_codes_and_scales_kl_weight():
    ca = torch.randn(2, 48)
    assert channel_distillation_loss(ca, ca.clone()).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 48)
    kl_only = channel_distillation_loss(other, ca, l1_weight=0.0)
    assert channel_distillation_loss(other, ca, l1_weight=0.0, kl_weight=3.0).item() == pytest.approx(
        3 * kl_only.item()
    )


def test_spatial_distillation_is_mean_squared_error():
    xk_s, xk_t = torch.ones(1, 8, 2, 2), torch.zeros(1, 8, 2, 2)
    xk_s[0, 0, 0, 0] = 3.0
    assert spatial_distillation_loss(xk_s, xk_t).item() == pytest.approx((31 * 1 + 9) / 32)


def test_distillation_losses_reject_mismatched_codes():
    with pytest.raises(ValueError, match="ca_s"):
        channel_distillation_loss(torch.zeros(2, 48), torch.zeros(2, 47))
    with pytest.raises(ValueError, match="xk_s"):
        spatial_distillation_loss(torch.zeros(1, 8, 4, 4), torch.zeros(1, 8, 4, 5))
