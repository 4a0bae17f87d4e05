"""Split the validation data of an accuracy-budget search into a *search* part and a *confirm* part.

The greedy search picks, among dozens of units, the ones whose float brings the metric back on the data it is
measured on; with a budget of about one sample, it fits that data's few borderline samples (vit_tiny on 360 hard
digits: -0.28 pt on val, -3.61 pt on the test split). So the search (sensitivity table, greedy order) sees only
the search part, and a step counts as met only when the confirm part, which chose nothing, meets the budget too.

The split is by position in the data, interleaved: sample ``i`` (counted across batches in the order the data
yields them) belongs to the confirm part when ``floor((i + 1) * share) > floor(i * share)``. So it is
deterministic (the same data in the same order gives the same parts, pass after pass and run after run: a resumed
search measures the same samples), the parts are disjoint and their sizes exact (``floor(n * share)`` confirm),
and data sorted by class (an image folder read in order) gives both parts the same class mix, which a contiguous
cut would not. It streams: the data is never held in memory, each pass selects rows of the batches as they come.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler

from compress.data import split_batch
from compress.errors import CompressError
from compress.inputs import batch_size, take

EPS = 1e-9
SHARE = 0.5  # default share of data.val held out to confirm: the search and the check get the same resolution


class SplitTooSmall(CompressError):
    """The data has too few samples for both parts to hold one (a recipe names its own field from these)."""

    def __init__(self, samples: int, share: float) -> None:
        self.samples, self.share = samples, share
        self.needed = max(2, math.ceil(1 / share - EPS))
        super().__init__(f"confirm={share}: the data has {samples} sample(s), too few to hold that share out to "
                         f"confirm on (at least {self.needed} needed); give more data, or confirm=0 to check the "
                         "budget on the data the search chose on")


def in_confirm(index: torch.Tensor, share: float) -> torch.Tensor:
    """Whether each global sample index belongs to the confirm part (module docstring)."""
    # the epsilon: 0.57 * 100 is 56.99999999999999 in binary; with it the part holds exactly confirmed(n, share)
    return torch.floor((index + 1) * share + EPS) > torch.floor(index * share + EPS)


def confirmed(n: int, share: float) -> int:
    """How many of ``n`` samples :func:`in_confirm` puts in the confirm part."""
    return math.floor(n * share + EPS)


class Part:
    """One part of ``data``: a re-iterable view yielding ``(inputs, labels)`` (or ``(inputs,)``) with only this
    part's rows of each batch; batches with none are skipped."""

    def __init__(self, data: Iterable[Any], share: float, confirm: bool) -> None:
        self.data, self.share, self.confirm = data, share, confirm

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        start = 0
        for batch in self.data:
            x, y = split_batch(batch)
            n = batch_size(x)
            mask = in_confirm(torch.arange(start, start + n, dtype=torch.float64), self.share)
            start += n
            index = torch.nonzero(mask if self.confirm else ~mask).flatten()
            if len(index) == 0:
                continue
            rows = take(x, index) if len(index) < n else x
            yield (rows,) if y is None else (rows, y[index] if len(index) < n else y)


@dataclass(frozen=True)
class Split:
    """The two parts and their sizes; ``confirm`` None when nothing is held out (``share`` 0)."""

    search: Iterable[Any]
    confirm: Part | None
    search_samples: int
    confirm_samples: int
    share: float


def count(data: Iterable[Any]) -> int:
    """Samples in ``data``: a DataLoader's dataset length where every sample is yielded, else one read (no forward)."""
    if isinstance(data, DataLoader) and not data.drop_last:
        try:
            return len(data.dataset)  # type: ignore[arg-type]
        except TypeError:  # an iterable dataset: no length
            pass
    return sum(batch_size(split_batch(batch)[0]) for batch in data)


def split(data: Iterable[Any], share: float) -> Split:
    """``data`` as a search part and a confirm part holding ``share`` of the samples out (0: no confirm part).

    Raises:
        CompressError: ``share`` outside [0, 1); ``data`` a shuffling DataLoader (the parts are by position).
        SplitTooSmall: ``share`` > 0 and the data too small for both parts to hold a sample.
    """
    if not 0 <= share < 1:
        raise CompressError(f"confirm must be a share in [0, 1), not {share}")
    if share > 0 and isinstance(getattr(data, "sampler", None), RandomSampler):
        raise CompressError(f"confirm={share}: the data is shuffled (a DataLoader with shuffle=True), so the parts "
                            "would change from pass to pass; pass an unshuffled loader")
    n = count(data)
    if share == 0:
        return Split(data, None, n, 0, 0.0)
    held = confirmed(n, share)
    if held < 1 or n - held < 1:
        raise SplitTooSmall(n, share)
    return Split(Part(data, share, confirm=False), Part(data, share, confirm=True), n - held, held, share)
