"""Model size and cost: parameters, nonzero parameters, multiply-accumulates (MACs)."""

from __future__ import annotations

import torch
from torch import nn

from compress.models import count_nonzero_params, count_params

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs of one sample through Conv*/ConvTranspose*/Linear layers (the layers that dominate cost)."""
    return sum(layer_macs(model, example).values())


@torch.no_grad()
def layer_macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """MACs of one sample per Conv*/ConvTranspose*/Linear module name (summed if forward calls it twice)."""
    macs: dict[str, int] = {}

    def conv_hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor, name: str) -> None:
        w = mod.weight
        if isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            # each input element scatters into out_channels/groups * kernel outputs
            n = inputs[0][0].numel() * w.shape[1] * w[0, 0].numel()
        else:
            n = out[0].numel() * w.shape[1] * w[0, 0].numel()
        macs[name] = macs.get(name, 0) + int(n)

    def linear_hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor, name: str) -> None:
        macs[name] = macs.get(name, 0) + int(out[0].numel() * mod.in_features)

    handles = []
    for name, mod in model.named_modules():
        hook = conv_hook if isinstance(mod, _CONV) else linear_hook if isinstance(mod, nn.Linear) else None
        if hook is not None:
            handles.append(mod.register_forward_hook(
                lambda m, i, o, name=name, hook=hook: hook(m, i, o, name)))  # type: ignore[misc]
    was_training = model.training
    model.eval()
    try:
        model(example[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return macs


def size_stats(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """``params``, ``nonzero_params`` and ``macs`` of a model, as report.json lists them."""
    return {"params": count_params(model), "nonzero_params": count_nonzero_params(model), "macs": count_macs(model, example)}
