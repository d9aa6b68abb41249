"""Degradation encoder (IDR extractor) and the teacher's contrastive head.

The encoder trunk is shared by teacher and student; only its input width differs
(3 image channels, or 3 + the 15/18-channel degradation prior map for the teacher).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IDR_CHANNELS = 128
#: (out_channels, stride) of the six conv + BN + LeakyReLU(0.1) stages.
ENCODER_STAGES = ((32, 1), (32, 1), (64, 2), (64, 1), (128, 2), (128, 1))


class ConvBNLeaky(nn.Sequential):
    """Conv3x3 -> BatchNorm -> LeakyReLU(0.1)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.norm: nn.BatchNorm2d | nn.SyncBatchNorm = nn.BatchNorm2d(out_channels)  # Sync under DDP on GPU
        self.act = nn.LeakyReLU(0.1, inplace=True)

    def per_view(self, x: torch.Tensor, views: int, repeat_first_view: bool) -> torch.Tensor:
        """This stage with BatchNorm statistics per view (see `DegradationEncoder.forward`)."""
        return per_view_batch_norm(self.norm, self.conv(x), views, repeat_first_view, self.act)


class DegradationEncoder(nn.Module):
    """LR image (plus, for the teacher, the prior map) -> spatial IDR (B, 128, ceil(H/4), ceil(W/4)).

    LightBSR keeps the IDR spatial (no global pooling, unlike DASR/KDSR).
    """

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.in_channels = in_channels
        stages = []
        channels = in_channels
        for out_channels, stride in ENCODER_STAGES:
            stages.append(ConvBNLeaky(channels, out_channels, stride))
            channels = out_channels
        self.stages = nn.Sequential(*stages)

    def forward(
        self, x: torch.Tensor, views: int = 1, repeat_first_view: bool = False, by_item: bool = False
    ) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, 128, ceil(H/4), ceil(W/4)).

        With `views` > 1, x holds `views` groups of N / views items one after the other (view-major) and
        every BatchNorm normalises each group with its own statistics, as `views` separate calls would
        (the convolutions are per item, so running them once over all groups is exact). With `by_item`,
        x's rows (and the output's) are item-major instead (row b * views + v: view v of item b), the
        layout the passes run in, so no rows are reordered. With `repeat_first_view`, each BatchNorm also
        updates its running statistics once more with the first group, as a further gradient-free call on
        that group alone would.
        """
        # NCHW, as the authors' encoder: the first layer's gradient is ill-conditioned (prior channels that
        # are constant per item, then a training-mode BatchNorm), so its float noise (~1e-3 relative) only
        # matches the authors' step in the same layout
        x = x.contiguous()
        if views == 1 and not repeat_first_view:
            return self.stages(x)
        if views < 1 or x.shape[0] % views:
            raise ValueError(f"views must divide the batch: {x.shape[0]} items, views={views}")
        # item-major inside (row b * V + v): one view's rows are then channels of a (B, V*C, H, W) view
        if not by_item:
            x = item_major(x, views)
        for stage in self.stages:
            assert isinstance(stage, ConvBNLeaky)
            x = stage.per_view(x, views, repeat_first_view)
        return x if by_item else item_major(x, x.shape[0] // views)

    @torch.no_grad()
    def forward_views_no_grad(self, x: torch.Tensor, views: int) -> torch.Tensor:
        """`forward(x, views, by_item=True)` without gradient, in channels_last (faster on CPU), each BatchNorm
        called once per view (rows regrouped view-major, so a view's items are one contiguous block).

        For the key encoder: nothing is differentiated through it, so its float noise (channels_last rounds
        differently from NCHW, ~1e-7 relative) is not amplified by the first layer's ill-conditioned gradient.
        """
        n, c, h, w = x.shape
        if views < 1 or n % views:
            raise ValueError(f"views must divide the batch: {n} items, views={views}")
        grouped = torch.empty((n, c, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        grouped.view(views, n // views, c, h, w).copy_(x.view(n // views, views, c, h, w).transpose(0, 1))
        for stage in self.stages:
            assert isinstance(stage, ConvBNLeaky)
            out = stage.conv(grouped)
            grouped = stage.act(torch.cat([stage.norm(view) for view in out.chunk(views)]))
        return item_major(grouped, views)


def item_major(x: torch.Tensor, views: int) -> torch.Tensor:
    """Rows view-major (v * B + b) -> item-major (b * V + v); with `views` = B, the inverse."""
    return x.view(views, x.shape[0] // views, *x.shape[1:]).transpose(0, 1).reshape(x.shape)


def per_view_batch_norm(
    norm: nn.BatchNorm2d | nn.SyncBatchNorm,
    x: torch.Tensor,
    views: int,
    repeat_first_view: bool,
    activation: nn.Module | None = None,
) -> torch.Tensor:
    """`norm` as if called once per view on x's item-major rows (row b * V + v): batch statistics and running
    updates per view, in view order, then, with `repeat_first_view`, once more (no gradient) on view 0.

    A plain BatchNorm runs once: x viewed as (B, V*C, H, W) holds view v's channels at v*C .. (v+1)*C - 1, so
    one training batch norm with the affine parameters repeated V times normalises each view with its own
    statistics (the same kernel and reduction as a per-view call); its running statistics are then updated per
    view from those statistics. SyncBatchNorm is called per view: the module call keeps its reduction across
    workers, so each view is normalised with that view's statistics on all workers.

    `activation` (possibly in place) follows the normalisation. It runs before the output's rows are regrouped
    into x's shape: an in-place operation on that regrouped view would make autograd copy the whole tensor back
    several times in the backward pass (a quarter of the encoder's backward time at B=8, 24x24).
    """
    act = activation if activation is not None else nn.Identity()
    if not norm.training:
        return act(norm(x))  # running statistics: the same for every view
    n, c, h, w = x.shape
    by_item = x.view(n // views, views, c, h, w)
    if isinstance(norm, nn.SyncBatchNorm):
        out = torch.stack([norm(by_item[:, v]) for v in range(views)], dim=1)
        if repeat_first_view:
            with torch.no_grad():
                norm(by_item[:, 0])
        return act(out).view(n, c, h, w)
    mean = var = None
    if norm.track_running_stats:  # momentum 1: these buffers receive this call's mean and unbiased variance
        mean, var = x.new_zeros(2, views * c)
    weight = None if norm.weight is None else norm.weight.repeat(views)
    bias = None if norm.bias is None else norm.bias.repeat(views)
    out = F.batch_norm(x.view(n // views, views * c, h, w), mean, var, weight, bias, True, 1.0, norm.eps)
    if mean is not None and var is not None:
        update_running_statistics(norm, mean.view(views, c), var.view(views, c), repeat_first_view)
    return act(out).view(n, c, h, w)


@torch.no_grad()
def update_running_statistics(
    norm: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, repeat_first_view: bool
) -> None:
    """One view's batch statistics (mean, unbiased variance: rows of (V, C)) after the other, then view 0 again,
    folded into `norm`'s running statistics as nn.BatchNorm2d's calls fold them (momentum, or a cumulative
    average when it is None).

    The calls' updates r <- (1 - f) r + f x are composed into one, r <- keep r + sum_v weight_v x_v (equal up
    to float rounding), so each buffer takes a few operations, not a few per view.
    """
    assert norm.running_mean is not None and norm.running_var is not None and norm.num_batches_tracked is not None
    order = [*range(mean.shape[0]), *([0] if repeat_first_view else [])]
    count = int(norm.num_batches_tracked) if norm.momentum is None else 0  # read only when the factor needs it
    keep, weights = 1.0, [0.0] * mean.shape[0]
    for view in order:
        count += 1
        factor = norm.momentum if norm.momentum is not None else 1.0 / count
        keep *= 1 - factor
        weights = [weight * (1 - factor) for weight in weights]
        weights[view] += factor
    weight = torch.tensor(weights, dtype=mean.dtype, device=mean.device)
    norm.running_mean.mul_(keep).add_(weight @ mean)
    norm.running_var.mul_(keep).add_(weight @ var)
    norm.num_batches_tracked.add_(len(order))


class ContrastiveHead(nn.Module):
    """IDR -> L2-normalised 128-d embedding for the MoCo loss: GAP -> Linear -> LeakyReLU -> Linear."""

    def __init__(self, channels: int = IDR_CHANNELS, dim: int = 128) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(channels, channels), nn.LeakyReLU(0.1, inplace=True), nn.Linear(channels, dim)
        )

    def forward(self, idr: torch.Tensor) -> torch.Tensor:
        pooled = idr.mean(dim=(2, 3))  # (B, 128, h, w) -> (B, 128)
        return F.normalize(self.mlp(pooled), dim=1)
