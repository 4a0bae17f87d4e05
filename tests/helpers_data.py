"""Dataset factories referenced by test recipes as ``helpers_data:NAME`` (the ``python`` data source).

``tests/conftest.py`` puts this folder on ``sys.path``, so the module imports as ``helpers_data``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset


def digits_like(n: int = 16, size: int = 8) -> TensorDataset:
    """``n`` random 1 x size x size images with labels 0..9 (deterministic)."""
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, size, size, generator=gen), torch.arange(n) % 10)


class _NanAt(Dataset):
    def __init__(self, n: int, bad: int) -> None:
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.zeros(1, 8, 8)
        if i == self.bad:
            x[0, 2, 3] = float("nan")
        return x, i % 10


def nan_at(n: int = 12, bad: int = 5) -> Dataset:
    """``n`` zero images, except sample ``bad`` which holds one NaN; NaN appears only when read."""
    return _NanAt(n, bad)


def not_a_dataset() -> int:
    """A factory that returns something that is not a Dataset."""
    return 42


def broken(reason: str = "disk on fire") -> Dataset:
    """A factory that raises, as a user's code might."""
    raise RuntimeError(reason)


class _Sized(Dataset):
    """Zero images with labels 0..9 that report ``length`` as their ``__len__`` whatever it is."""

    def __init__(self, length: object) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length  # type: ignore[return-value]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(1, 8, 8), i % 10


def sized(length: object = -1) -> Dataset:
    """A dataset whose ``__len__`` returns ``length`` (-1, 1.5, ...): what a buggy user dataset does."""
    return _Sized(length)


def float_labels(n: int = 32) -> TensorDataset:
    """``n`` random images whose labels are floats (0.0 .. 9.0): regression targets, not classes."""
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=gen), (torch.arange(n) % 10).float())


def unlabeled(n: int = 32) -> TensorDataset:
    """``n`` random images and no labels."""
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)))


def digit_segments(split: str = "train", n: int = 64, size: int = 32, classes: int = 4) -> TensorDataset:
    """A small segmentation set from sklearn digits: each 8x8 digit upsampled (nearest) to ``size`` x ``size``,
    3 channels in [0, 1]; the mask ``[size, size]`` labels the digit's strokes (ink above half the maximum)
    with ``digit + 1`` and the background 0. Only digits 0..classes-2 are used, so labels are 0..classes-1.
    ``split``: train (first 1000 images) or test (the rest)."""
    from sklearn.datasets import load_digits

    images, targets = load_digits(return_X_y=True)
    keep = targets < classes - 1
    start = 0 if split == "train" else 1000
    idx = [i for i in range(start, len(targets)) if keep[i]][:n]
    x = torch.tensor(images[idx], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    x = nn.functional.interpolate(x, size=(size, size), mode="nearest")
    label = torch.tensor(targets[idx], dtype=torch.long).reshape(-1, 1, 1)
    mask = torch.where(x[:, 0] > 0.5, label + 1, torch.zeros_like(label))
    return TensorDataset(x.expand(-1, 3, -1, -1).contiguous(), mask)
