"""Model size and cost: parameters, nonzero parameters, multiply-accumulates (MACs)."""

from __future__ import annotations

import torch
from torch import nn

from compress.models import count_nonzero_params, count_params

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@torch.no_grad()
def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs of one sample through Conv*/ConvTranspose*/Linear layers (the layers that dominate cost)."""
    total = 0

    def conv_hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        w = mod.weight
        if isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            # each input element scatters into out_channels/groups * kernel outputs
            total += inputs[0][0].numel() * w.shape[1] * w[0, 0].numel()
        else:
            total += out[0].numel() * w.shape[1] * w[0, 0].numel()

    def linear_hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        total += out[0].numel() * mod.in_features

    handles = []
    for mod in model.modules():
        if isinstance(mod, _CONV):
            handles.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        model(example[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return int(total)


def size_stats(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """``params``, ``nonzero_params`` and ``macs`` of a model, as report.json lists them."""
    return {"params": count_params(model), "nonzero_params": count_nonzero_params(model), "macs": count_macs(model, example)}
