"""Multiply-accumulate and parameter counts as the paper reports them.

MACs follow the thop convention for the layers that carry the work: a Conv2d costs
``output elements * in_channels / groups * kernel area`` and a Linear ``output elements *
in_features``; biases, norms, activations and pooling are not counted. Run the model on the
``meta`` device to count a large input without computing it.
"""

from __future__ import annotations

import torch
from torch import nn


def layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kernel_area = module.kernel_size[0] * module.kernel_size[1]
        return output.numel() * (module.in_channels // module.groups) * kernel_area
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


@torch.no_grad()
def count_macs(model: nn.Module, *inputs: torch.Tensor, **kwargs: object) -> int:
    """Conv2d + Linear multiply-accumulates of one ``model(*inputs, **kwargs)`` call."""
    total = 0

    def add(module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += layer_macs(module, output)

    handles = [m.register_forward_hook(add) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        model(*inputs, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return total


def count_parameters(model: nn.Module) -> int:
    """Parameters of the inference path, counted as the authors count them.

    Every parameter of the model, the frozen mean-shift layers included (24 values, as in the
    authors' ``n_params``), except the teacher's momentum copies (``key_encoder``, ``key_head``),
    which exist only for the contrastive loss.
    """
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith(("key_encoder.", "key_head.")))


def count_trainable_parameters(model: nn.Module) -> int:
    """Parameters the optimiser updates (frozen mean shift and momentum copies excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
