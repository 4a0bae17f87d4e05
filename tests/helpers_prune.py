"""Models the pruning tests need: forwards the channel surgery cannot or must not follow."""

from __future__ import annotations

import torch
from torch import nn


class HardReshape(nn.Module):
    """``view(-1, 512)`` hard-codes conv1's 8 channels x 8 x 8: pruning conv1 must be refused."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv1(x)).view(-1, 512))


class Detached(nn.Module):
    """conv1's output leaves autograd through numpy: the dependency tracer loses it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.from_numpy(self.conv1(x).detach().numpy().copy())
        return self.fc(self.conv2(y).mean((2, 3)))


def hard_reshape() -> HardReshape:
    return HardReshape()


class ScaledHead(nn.Module):
    """The model's output is ``fc(x) * 2``, not fc's own output tensor: fc must still keep its channels."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))
        return self.fc(x.mean((2, 3))) * 2


class ConcatGrouped(nn.Module):
    """Two branches concatenated into a grouped conv: the group positions differ per branch."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.b = nn.Conv2d(1, 8, 3, padding=1)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.g(torch.cat([self.a(x), self.b(x)], 1))
        return self.fc(y.mean((2, 3)))


def scaled_head() -> ScaledHead:
    return ScaledHead()
