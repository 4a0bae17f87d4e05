"""``data.val: {holdout: F}``: which samples of the train split are held out to select on.

The split is a pure function of the dataset's labels (or its length), the fraction and the seed:
the same recipe holds out the same samples on every run, every rank and every resume.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from compress.errors import DataError


def cheap_labels(dataset: Dataset) -> np.ndarray | None:
    """Integer class labels of every sample, where they can be read without loading the samples.

    Reads a ``TensorDataset``'s second tensor or a ``targets`` attribute (torchvision datasets,
    ``ImageFolder``), through any ``Subset``; None otherwise (or when labels are not class indices).
    """
    if isinstance(dataset, Subset):
        inner = cheap_labels(dataset.dataset)
        return None if inner is None else inner[np.asarray(dataset.indices, dtype=np.int64)]
    labels: object = None
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        labels = dataset.tensors[1]
    elif hasattr(dataset, "targets"):
        labels = dataset.targets
    if isinstance(labels, torch.Tensor):
        labels = labels.cpu().numpy()
    try:
        array = np.asarray(labels)
    except (TypeError, ValueError):
        return None
    if array.ndim != 1 or len(array) != len(dataset) or not np.issubdtype(array.dtype, np.integer):  # type: ignore[arg-type]
        return None
    return array


def holdout_indices(n: int, fraction: float, seed: int, labels: np.ndarray | None = None) -> tuple[list[int], list[int]]:
    """Split ``range(n)`` into ``(train, held_out)`` index lists, both sorted.

    ``round(fraction * n)`` samples are held out (at least one, and at least one left to train on).
    With ``labels``, each class gives its share (largest remainders settle the rounding), so the
    held-out part keeps the class balance; without, a seeded permutation picks them.

    Raises:
        DataError: fewer than two samples, so nothing can be held out and still leave one to train on.
    """
    if n < 2:
        raise DataError(f"holdout {fraction} needs at least 2 samples in data.train, found {n}")
    size = min(n - 1, max(1, int(np.floor(fraction * n + 0.5))))
    rng = np.random.default_rng(seed)
    if labels is None:
        held = rng.permutation(n)[:size]
    else:
        classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        ideal = counts * size / n
        take = np.floor(ideal).astype(np.int64)
        short = size - int(take.sum())
        # the classes with the largest fractional parts get the remaining samples; ties by class order
        take[np.argsort(-(ideal - take), kind="stable")[:short]] += 1
        held = np.concatenate([
            rng.permutation(np.flatnonzero(inverse == c))[: take[c]] for c in range(len(classes))
        ])
    mask = np.zeros(n, dtype=bool)
    mask[held] = True
    return np.flatnonzero(~mask).tolist(), np.flatnonzero(mask).tolist()
