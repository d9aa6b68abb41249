"""Cheap input checks for the networks: a clear ValueError instead of a broadcast or a cryptic conv error.

They run on every forward pass, so they only read shapes and dtypes (no data access).
"""

from __future__ import annotations

import torch


def check_image_batch(x: object, name: str = "lr", channels: int = 3) -> None:
    """Require a floating (B, channels, H, W) tensor with B, H, W >= 1."""
    expected = f"a float tensor of shape (B, {channels}, H, W)"
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected {expected}, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected {expected}, got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"{name}: expected {expected}, got {x.shape[1]} channels (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected {expected}, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name}: expected {expected} with B, H, W >= 1, got shape {tuple(x.shape)}")


def check_prior_batch(prior: object, batch: int, width: int, name: str = "prior") -> None:
    """Require a floating (batch, width) prior vector: one degradation code per image, no broadcasting."""
    expected = f"a float tensor of shape ({batch}, {width})"
    if not isinstance(prior, torch.Tensor):
        raise ValueError(f"{name}: expected {expected}, got {type(prior).__name__}")
    if tuple(prior.shape) != (batch, width):
        raise ValueError(f"{name}: expected {expected}, got shape {tuple(prior.shape)}")
    if not prior.is_floating_point():
        raise ValueError(f"{name}: expected {expected}, got dtype {prior.dtype}")


def check_codes(ca: object, xk: object, lr: torch.Tensor, code_channels: int = 48, map_channels: int = 8) -> None:
    """Require codes that fit the image: ca (B, 48) and xk (B, 8, H, W) for lr (B, 3, H, W)."""
    batch, _, height, width = lr.shape
    for name, code, shape in (
        ("ca", ca, (batch, code_channels)),
        ("xk", xk, (batch, map_channels, height, width)),
    ):
        expected = f"a float tensor of shape {shape}"
        if not isinstance(code, torch.Tensor):
            raise ValueError(f"{name}: expected {expected}, got {type(code).__name__}")
        if tuple(code.shape) != shape:
            raise ValueError(f"{name}: expected {expected}, got shape {tuple(code.shape)}")
        if not code.is_floating_point():
            raise ValueError(f"{name}: expected {expected}, got dtype {code.dtype}")
