"""A dataset factory whose default is the *train* split, as many users' are: ``helpers_splits:digits``.

``compress check --data python:helpers_splits:digits`` must show that it read ``split=train``;
``?split=test`` (or ``--data-kwargs``) picks the test split. ``tests/conftest.py`` puts this folder
on ``sys.path``.
"""

from __future__ import annotations

from torch.utils.data import Dataset

from compress.data import build_dataset
from compress.recipe import DigitsData


def digits(split: str = "train", size: int = 8) -> Dataset:
    """scikit-learn digits, the same deterministic 80/20 split as the ``digits`` source."""
    return build_dataset(DigitsData(source="digits", split=split, size=size))
