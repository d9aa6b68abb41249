"""The teacher: the student's networks fed the true degradation prior, plus a MoCo contrastive head.

The contrastive loss itself is computed outside (``lightbsr.losses``); this module holds the
query/key encoders, the queue and the momentum and enqueue updates.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from lightbsr.encoder import ContrastiveHead, DegradationEncoder
from lightbsr.generator import Generator
from lightbsr.validation import check_image_batch, check_prior_batch

PRIOR_CHANNELS = {1: 15, 2: 18}  # setting 1: kernel PCA code; setting 2: + noise sigma x3
EMBEDDING_DIM = 128


class Teacher(nn.Module):
    """(LR, prior (B, 15|18)) -> SR; the prior is broadcast to a constant map beside the image channels."""

    queue: torch.Tensor
    queue_ptr: torch.Tensor

    def __init__(
        self,
        scale: int = 4,
        setting: int = 1,
        n_groups: int = 8,
        n_blocks: int = 8,
        queue_size: int = 8192,
        momentum: float = 0.999,
    ) -> None:
        super().__init__()
        if setting not in PRIOR_CHANNELS:
            raise ValueError(f"setting: expected 1 or 2, got {setting!r}")
        if queue_size < 1 or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"queue_size >= 1 and momentum in [0, 1] expected, got {queue_size}, {momentum}")
        self.scale = scale
        self.setting = setting
        self.prior_channels = PRIOR_CHANNELS[setting]
        self.momentum = momentum
        self.encoder = DegradationEncoder(3 + self.prior_channels)
        self.head = ContrastiveHead(dim=EMBEDDING_DIM)
        self.key_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.key_head = copy.deepcopy(self.head).requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(EMBEDDING_DIM, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.generator = Generator(scale, n_groups, n_blocks)

    def prior_map(self, prior: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, P) prior vector -> constant (B, P, H, W) map."""
        return prior[:, :, None, None].expand(-1, -1, *size)

    def encoder_input(self, lr: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """Validated cat[LR, prior map]: (B, 3 + P, H, W)."""
        check_image_batch(lr, "lr")
        check_prior_batch(prior, lr.shape[0], self.prior_channels)
        height, width = lr.shape[-2:]
        return torch.cat([lr, self.prior_map(prior.to(lr.dtype), (height, width))], dim=1)

    def encode(self, lr: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """Query encoder -> spatial IDR (B, 128, ceil(H/4), ceil(W/4))."""
        return self.encoder(self.encoder_input(lr, prior))

    def embed(self, lr: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """Query embedding q (B, 128), L2-normalised."""
        return self.head(self.encode(lr, prior))

    @torch.no_grad()
    def embed_keys(self, lr: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """Key embedding k (B, 128) from the momentum encoder, L2-normalised, no gradient."""
        return self.key_head(self.key_encoder(self.encoder_input(lr, prior)))

    def forward(
        self, lr: torch.Tensor, prior: torch.Tensor, return_codes: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.generator(lr, self.encode(lr, prior), return_codes=return_codes)

    def query_key_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        query = [*self.encoder.parameters(), *self.head.parameters()]
        key = [*self.key_encoder.parameters(), *self.key_head.parameters()]
        return list(zip(query, key, strict=True))

    @torch.no_grad()
    def momentum_update(self) -> None:
        """key <- m * key + (1 - m) * query, parameters only (BatchNorm statistics are the key encoder's own)."""
        for query, key in self.query_key_pairs():
            key.mul_(self.momentum).add_(query.detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write keys (N, 128) into the queue at the pointer, wrapping around its end."""
        queue_size = self.queue.shape[1]
        if keys.dim() != 2 or keys.shape[1] != EMBEDDING_DIM or keys.shape[0] > queue_size:
            raise ValueError(
                f"keys: expected shape (N, {EMBEDDING_DIM}) with N <= {queue_size}, got {tuple(keys.shape)}"
            )
        ptr = int(self.queue_ptr[0])
        slots = (ptr + torch.arange(keys.shape[0], device=self.queue.device)) % queue_size
        self.queue[:, slots] = keys.detach().t().to(self.queue.dtype)
        self.queue_ptr[0] = (ptr + keys.shape[0]) % queue_size
