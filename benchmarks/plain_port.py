"""The authors' student arithmetic written out plainly, for `benchmarks/inference.py`'s baseline.

`plain_forward(student, lr)` runs our student's own weights the way their `model/student.py`
computes: NCHW tensors, `torch.cat` for every concatenation, out-of-place GELU and sigmoid, the
ConvNeXt's permute to (B, H, W, C) and back, `input + gamma * y` as separate ops. Same weights,
same result (the benchmark checks it), none of our memory-layout or in-place changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightbsr.generator import AdaptationBlock, Group, InvertedBottleneck
from lightbsr.student import Student


def plain_ffn(ffn: InvertedBottleneck, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    y = ffn.dwconv(x).permute(0, 2, 3, 1)
    y = ffn.pwconv2(F.gelu(ffn.pwconv1(ffn.norm(y))))
    return shortcut + (ffn.gamma * y).permute(0, 3, 1, 2)


def plain_block(block: AdaptationBlock, x: torch.Tensor, ca: torch.Tensor, xk: torch.Tensor) -> torch.Tensor:
    x1, x2 = torch.split(x, block.split, dim=1)
    spatial = block.spatial
    attention = torch.sigmoid(spatial.attend(F.gelu(spatial.reduce(torch.cat([xk, x1], dim=1)))))
    x1 = spatial.partial_conv(x1 * attention)
    gate = torch.sigmoid(block.channel.mlp(torch.cat([x2.mean(dim=(2, 3)), ca], dim=1)))
    mixed = F.gelu(torch.cat([x1, x2 * gate[:, :, None, None]], dim=1))
    return plain_ffn(block.ffn, mixed, shortcut=x)


def plain_group(group: Group, x: torch.Tensor, ca: torch.Tensor, xk: torch.Tensor):
    ca, xk = group.refine(ca, xk)
    res = x
    for block in group.blocks:
        res = plain_block(block, res, ca, xk)
    res = group.fuse(plain_ffn(group.convnext.ffn, res, shortcut=res))
    return res + x, ca, xk


@torch.no_grad()
def plain_forward(student: Student, lr: torch.Tensor) -> torch.Tensor:
    """LR (B, 3, H, W) -> SR, untiled, in NCHW memory throughout."""
    generator = student.generator
    ca, xk = generator.convert(student.encoder(lr), (lr.shape[-2], lr.shape[-1]))
    x = generator.head(generator.sub_mean(lr))
    res = x
    for group in generator.groups:
        res, ca, xk = plain_group(group, res, ca, xk)
    res = generator.body_conv(res) + x
    return generator.add_mean(generator.to_rgb(generator.upsample(res)))
