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
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.LeakyReLU(0.1, inplace=True)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NCHW, as the authors' encoder: the first layer's gradient is ill-conditioned (prior channels that
        # are constant per item, then a training-mode BatchNorm), so its float noise (~1e-3 relative) only
        # matches the authors' step in the same layout; channels_last saves ~3% of a teacher step
        return self.stages(x.contiguous())  # (B, C_in, H, W) -> (B, 128, ceil(H/4), ceil(W/4))


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
