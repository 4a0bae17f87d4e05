"""Models the ONNX exporter cannot write at opset 13, referenced by recipes as helpers_unexportable:FN."""

import torch
from torch import nn


class TriuDigits(nn.Module):
    """A digits classifier (8x8 inputs) that keeps the upper triangle of each image: ``aten::triu`` has an
    ONNX export only from opset 14 (Trilu), and compress does not rewrite it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(-1, 8, 8).triu().reshape(-1, 64))


def triu_digits() -> TriuDigits:
    torch.manual_seed(0)
    return TriuDigits()
