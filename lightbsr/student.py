"""The student: the shipped LightBSR model, which sees only the LR image."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from lightbsr.encoder import DegradationEncoder
from lightbsr.generator import Generator
from lightbsr.validation import check_image_batch

if TYPE_CHECKING:
    from lightbsr.teacher import Teacher


class Student(nn.Module):
    """LR (B, 3, H, W) in [0, 1] -> SR (B, 3, sH, sW); the encoder estimates the IDR from the LR alone."""

    def __init__(self, scale: int = 4, n_groups: int = 8, n_blocks: int = 8) -> None:
        super().__init__()
        self.scale = scale
        self.encoder = DegradationEncoder(3)
        self.generator = Generator(scale, n_groups, n_blocks)

    def encode(self, lr: torch.Tensor) -> torch.Tensor:
        """LR -> spatial IDR (B, 128, ceil(H/4), ceil(W/4))."""
        check_image_batch(lr, "lr")
        return self.encoder(lr)

    def encode_tile(self, lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LR crop -> (its IDR, its spatial code xk (B, 8, H, W)): `lightbsr.tiling.TileModel`."""
        idr = self.encode(lr)
        return idr, self.generator.converter.spatial_code_of(idr, (lr.shape[-2], lr.shape[-1]))

    def reconstruct_tile(self, lr: torch.Tensor, idr_mean: torch.Tensor, xk: torch.Tensor) -> torch.Tensor:
        """LR tile, the whole image's mean IDR (B, 128) and the tile's xk -> SR tile: `lightbsr.tiling.TileModel`."""
        return self.generator.reconstruct(lr, self.generator.converter.channel_code_of(idr_mean), xk)

    def forward(
        self, lr: torch.Tensor, return_codes: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SR, or (SR, ca, xk) with the converted codes before the first group (the distillation targets)."""
        return self.generator(lr, self.encode(lr), return_codes=return_codes)

    @torch.no_grad()
    def load_from_teacher(self, teacher: Teacher) -> None:
        """Initialise from a trained teacher: the generator whole, the encoder except its first conv.

        The first conv differs in width (3 vs 3 + prior channels) and keeps its own initialisation;
        the BatchNorm after it is copied, as in the authors' ``initparams`` path.
        """
        if teacher.generator.scale != self.scale:
            raise ValueError(f"teacher: expected a x{self.scale} teacher, got x{teacher.generator.scale}")
        self.generator.load_state_dict(teacher.generator.state_dict())
        first_conv = ("stages.0.conv.weight", "stages.0.conv.bias")
        encoder_state = {k: v for k, v in teacher.encoder.state_dict().items() if k not in first_conv}
        missing, unexpected = self.encoder.load_state_dict(encoder_state, strict=False)
        if set(missing) != set(first_conv) or unexpected:
            raise ValueError(f"teacher encoder does not fit the student's: missing {missing}, unexpected {unexpected}")
