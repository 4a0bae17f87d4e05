"""Model factories for bad-input tests, referenced as helpers_models:FN."""

import torch
from torch import nn


class TwoInputs(nn.Module):
    """A model whose forward needs two tensors: fed one, it raises TypeError (not RuntimeError)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1) * mask)


def two_inputs() -> TwoInputs:
    return TwoInputs()


def failing_metric(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    raise ZeroDivisionError("no samples")


def tiny_linear() -> nn.Module:
    """A model from a module compress does not trust by default (checkpoint trust tests)."""
    return nn.Sequential(nn.Linear(4, 3))
