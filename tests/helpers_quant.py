"""Small models and loaders for the quantization tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

import compress
import compress.metrics
from compress.data import build_loader
from compress.recipe import DigitsData


def digits(split: str, batch_size: int = 128) -> DataLoader:
    return build_loader(DigitsData(source="digits", split=split, batch_size=batch_size), f"digits:{split}", train=False)


def top1(model: nn.Module, loader: DataLoader) -> float:
    return compress.metrics.score("top1", compress.metrics.collect(model, loader))["top1"]


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so only layers get quantized."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:
            y = y + x
        return self.fc(torch.relu(y).flatten(1))


class NanAfterConv(nn.Module):
    """Produces NaN activations (log of negative numbers) between two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.log(self.conv(x) - 100.0).flatten(1))


class DeadBranch(nn.Module):
    """The second conv's input is always zero: calibrating it gives amax 0."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.conv(x) * 0.0).flatten(1))


def branchy() -> Branchy:
    return Branchy()


def nan_after_conv() -> NanAfterConv:
    return NanAfterConv()


def dead_branch() -> DeadBranch:
    return DeadBranch()
