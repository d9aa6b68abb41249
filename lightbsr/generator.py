"""The LightBSR generator G: IDR converter, adaptation blocks, groups and the x2/x3/x4 tails.

G is identical in teacher and student. It turns the encoder's spatial IDR into two codes,
a channel code ``ca`` (B, 48) and a spatial code ``xk`` (B, 8, H, W), and reconstructs the
SR image from the LR image and those codes. Layout and arithmetic follow the authors' code
(MJ-NCEPU/LightBSR, ``model/student.py``) so their checkpoints load (see ``reference.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightbsr.encoder import IDR_CHANNELS
from lightbsr.validation import check_codes, check_image_batch

FEATURES = 64
CODE_CHANNELS = 48  # channel code width = 3/4 of the features
MAP_CHANNELS = 8  # spatial code width: 128 IDR channels / PixelShuffle(4)^2
DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)
SUPPORTED_SCALES = (2, 3, 4)


def conv3x3(in_channels: int, out_channels: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """NHWC memory (same NCHW tensor): oneDNN convs run faster on it, and the ConvNeXt
    permutes to (B, H, W, C) become free views instead of copies."""
    return x.contiguous(memory_format=torch.channels_last)


def gelu_(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU, in place when autograd does not need x (inference), saving an allocation.

    Only for intermediate tensors this module created itself.
    """
    if x.requires_grad:
        return F.gelu(x)
    return torch.ops.aten.gelu_(x)


def fit_to_size(xk: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Crop (or reflect-pad, as the authors' ``check_image_size``) a map to exactly height x width."""
    pad_h, pad_w = height - xk.shape[-2], width - xk.shape[-1]
    if pad_h <= 0 and pad_w <= 0:
        return xk[..., :height, :width]
    return F.pad(xk, (0, pad_w, 0, pad_h), mode="reflect")


class MeanShift(nn.Conv2d):
    """Fixed 1x1 conv adding sign * the DIV2K RGB mean (the authors' layer; frozen, but kept as parameters
    so their checkpoints map one to one and parameter counts match theirs)."""

    def __init__(self, sign: int) -> None:
        super().__init__(3, 3, 1)
        with torch.no_grad():
            self.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.get_parameter("bias").copy_(sign * torch.tensor(DIV2K_RGB_MEAN))
        self.requires_grad_(False)


class IDRConverter(nn.Module):
    """Spatial IDR -> channel code ca (B, 48) and spatial code xk (B, 8, H, W)."""

    def __init__(self, idr_channels: int = IDR_CHANNELS) -> None:
        super().__init__()
        self.channel_code = nn.Linear(idr_channels, CODE_CHANNELS, bias=False)
        self.spatial_code = conv3x3(MAP_CHANNELS, MAP_CHANNELS)

    def forward(self, idr: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.channel_code_of(idr.mean(dim=(2, 3))), self.spatial_code_of(idr, size)

    def channel_code_of(self, idr_mean: torch.Tensor) -> torch.Tensor:
        """The IDR averaged over the image (B, 128) -> ca (B, 48)."""
        return F.gelu(self.channel_code(idr_mean))

    def spatial_code_of(self, idr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """IDR (B, 128, h, w) -> xk (B, 8, *size); each pixel needs only the IDR cells around it, so a crop
        of the IDR gives the matching crop of xk away from the crop's edges (tiling relies on this)."""
        xk = F.pixel_shuffle(idr, 4)  # (B, 128, h, w) -> (B, 8, 4h, 4w)
        xk = fit_to_size(xk, *size)  # -> (B, 8, H, W)
        return F.gelu(self.spatial_code(xk))


class CodeRefinement(nn.Module):
    """Per-group residual refinement of both codes; the refined codes go on to the next group."""

    def __init__(self) -> None:
        super().__init__()
        self.channel = nn.Sequential(
            nn.Linear(CODE_CHANNELS, 2 * CODE_CHANNELS),
            nn.GELU(),
            nn.Linear(2 * CODE_CHANNELS, CODE_CHANNELS),
            nn.GELU(),
        )
        self.spatial = nn.Sequential(
            conv3x3(MAP_CHANNELS, 2 * MAP_CHANNELS), nn.GELU(), conv3x3(2 * MAP_CHANNELS, MAP_CHANNELS), nn.GELU()
        )

    def forward(self, ca: torch.Tensor, xk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ca + self.channel(ca), xk + self.spatial(xk)


class InvertedBottleneck(nn.Module):
    """The ConvNeXt mixer with its residual: shortcut + gamma * MLP(LayerNorm(depthwise7x7(x))).

    The MLP is Linear 64->128 -> GELU -> Linear 128->64 on (B, H, W, C); layer scale gamma starts at 1e-6.
    """

    def __init__(self, channels: int = FEATURES, layer_scale: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.pwconv1 = nn.Linear(channels, 2 * channels)
        self.pwconv2 = nn.Linear(2 * channels, channels)
        self.gamma = nn.Parameter(torch.full((channels,), layer_scale))

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C): a view in channels_last
        y = self.pwconv2(gelu_(self.pwconv1(self.norm(y))))
        out = torch.addcmul(shortcut.permute(0, 2, 3, 1), y, self.gamma)  # shortcut + gamma * y, one pass
        return out.permute(0, 3, 1, 2)  # -> (B, C, H, W)


class ConvNeXtBlock(nn.Module):
    """Plain ConvNeXt block: x + gamma * MLP(LayerNorm(depthwise7x7(x)))."""

    def __init__(self, channels: int = FEATURES) -> None:
        super().__init__()
        self.ffn = InvertedBottleneck(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(x, shortcut=x)


class SpatialModulation(nn.Module):
    """Spatial branch on the first quarter of the channels: x1 -> PConv5x5(x1 * sigmoid(att(cat[xk, x1]))),
    att = Conv3x3(GELU(Conv1x1(.)))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(MAP_CHANNELS + channels, channels, 1, bias=False)
        self.attend = conv3x3(channels, channels, bias=False)
        self.partial_conv = nn.Conv2d(channels, channels, 5, padding=2, bias=False)

    def forward(self, x1: torch.Tensor, xk: torch.Tensor) -> torch.Tensor:
        attention = self.attend(gelu_(self.reduce(torch.cat([xk, x1], dim=1))))  # (B, 16, H, W)
        attention = torch.sigmoid_(attention)  # in place is autograd-safe: sigmoid's backward uses its output
        return self.partial_conv(x1 * attention)


class ChannelModulation(nn.Module):
    """Channel branch on the other three quarters: gate = sigmoid(MLP(cat[GAP(x2), ca])), x2 * gate."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = channels // 2
        self.mlp = nn.Sequential(
            nn.Linear(channels + CODE_CHANNELS, hidden, bias=False), nn.GELU(), nn.Linear(hidden, channels, bias=False)
        )

    def gate(self, x2: torch.Tensor, ca: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mlp(torch.cat([x2.mean(dim=(2, 3)), ca], dim=1)))  # (B, 48)


class AdaptationBlock(nn.Module):
    """IDR adaptation block: code-modulated split mixing, then a ConvNeXt mixer, one residual around all."""

    def __init__(self, channels: int = FEATURES) -> None:
        super().__init__()
        self.split = [channels // 4, channels - channels // 4]  # [16, 48]
        self.spatial = SpatialModulation(self.split[0])
        self.channel = ChannelModulation(self.split[1])
        self.ffn = InvertedBottleneck(channels)

    def forward(self, x: torch.Tensor, ca: torch.Tensor, xk: torch.Tensor) -> torch.Tensor:
        x1, x2 = torch.split(x, self.split, dim=1)
        # cat[spatial(x1), x2 * gate] without the cat: gate all 64 channels (x1's with 1), then overwrite x1's slot
        gate = torch.cat([ca.new_ones(x.shape[0], self.split[0]), self.channel.gate(x2, ca)], dim=1)
        mixed = x * gate[:, :, None, None]  # (B, 64, H, W)
        mixed[:, : self.split[0]] = self.spatial(x1, xk)
        return self.ffn(gelu_(mixed), shortcut=x)


class Group(nn.Module):
    """Code refinement -> n adaptation blocks -> ConvNeXt block -> Conv3x3, plus the group input."""

    def __init__(self, n_blocks: int = 8, channels: int = FEATURES) -> None:
        super().__init__()
        self.refine = CodeRefinement()
        self.blocks = nn.ModuleList(AdaptationBlock(channels) for _ in range(n_blocks))
        self.convnext = ConvNeXtBlock(channels)
        self.fuse = conv3x3(channels, channels)

    def forward(
        self, x: torch.Tensor, ca: torch.Tensor, xk: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ca, xk = self.refine(ca, xk)
        res = x
        for block in self.blocks:
            res = block(res, ca, xk)
        res = self.fuse(self.convnext(res))
        return res + x, ca, xk


def make_upsampler(scale: int, channels: int = FEATURES) -> nn.Sequential:
    """x2/x4: [Conv3x3(64, 256) + PixelShuffle(2)] once/twice; x3: Conv3x3(64, 576) + PixelShuffle(3)."""
    if scale not in SUPPORTED_SCALES:
        raise ValueError(f"scale: expected one of {SUPPORTED_SCALES}, got {scale!r}")
    factors = (3,) if scale == 3 else (2,) * (scale // 2)
    layers: list[nn.Module] = []
    for factor in factors:
        layers += [conv3x3(channels, factor * factor * channels), nn.PixelShuffle(factor)]
    return nn.Sequential(*layers)


class Generator(nn.Module):
    """LightBSR generator: (LR, IDR) -> SR, with the converted codes exposed for distillation and tiling."""

    def __init__(self, scale: int, n_groups: int = 8, n_blocks: int = 8) -> None:
        super().__init__()
        self.scale = scale
        self.n_groups = n_groups
        self.n_blocks = n_blocks
        self.sub_mean = MeanShift(-1)
        self.add_mean = MeanShift(+1)
        self.head = conv3x3(3, FEATURES)
        self.converter = IDRConverter()
        self.groups = nn.ModuleList(Group(n_blocks) for _ in range(n_groups))
        self.body_conv = conv3x3(FEATURES, FEATURES)
        self.upsample = make_upsampler(scale)
        self.to_rgb = conv3x3(FEATURES, 3)

    def convert(self, idr: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """IDR of the whole image -> (ca (B, 48), xk (B, 8, *size))."""
        return self.converter(idr, size)

    def reconstruct(self, lr: torch.Tensor, ca: torch.Tensor, xk: torch.Tensor) -> torch.Tensor:
        """LR (B, 3, H, W) and codes -> SR (B, 3, sH, sW). xk must cover exactly lr's H x W."""
        check_image_batch(lr, "lr")
        check_codes(ca, xk, lr)
        x = self.head(self.sub_mean(channels_last(lr)))
        res = x
        for group in self.groups:
            res, ca, xk = group(res, ca, xk)
        res = self.body_conv(res) + x
        return self.add_mean(self.to_rgb(self.upsample(res))).contiguous()

    def forward(
        self, lr: torch.Tensor, idr: torch.Tensor, return_codes: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        height, width = lr.shape[-2:]
        ca, xk = self.convert(idr, (height, width))
        sr = self.reconstruct(lr, ca, xk)
        return (sr, ca, xk) if return_codes else sr
