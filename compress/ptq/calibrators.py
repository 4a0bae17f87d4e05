"""Calibrators: ``collect(x)``, ``reset()``, ``compute_amax()``. Statistics stay on the tensor's device."""

from __future__ import annotations

import math
from enum import Enum

import torch

from compress.errors import DataError
from compress.ptq import search


def _check_finite(low: torch.Tensor, high: torch.Tensor) -> None:
    if not bool(torch.isfinite(low + high)):  # min/max propagate NaN: no extra pass over the tensor
        raise DataError("NaN or Inf activations during calibration")


class Method(str, Enum):
    """How an activation's clipping range is chosen."""

    max = "max"
    percentile = "percentile"
    entropy = "entropy"
    mse = "mse"
    auto = "auto"  # per quantizer, the one of the four above with the least error downstream (compress.ptq.auto)


class _Range:
    """The running minimum and max |x| every calibrator keeps: whether it saw data, whether all of it
    was >= 0, and the largest magnitude (for the calibration table)."""

    min: torch.Tensor | None = None
    top: torch.Tensor | None = None

    def _observe(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(min, max)`` of ``x``, checked finite, folded into the running minimum and max |x|."""
        low, high = torch.aminmax(x)
        _check_finite(low, high)
        self.min = low if self.min is None else torch.minimum(self.min, low)
        top = torch.maximum(-low, high)
        self.top = top if self.top is None else torch.maximum(self.top, top)
        return low, high

    @property
    def seen(self) -> bool:
        return self.min is not None

    @property
    def nonneg(self) -> bool:
        return self.min is not None and float(self.min) >= 0


class MaxCalibrator(_Range):
    """Running max of |x| (per tensor)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.amax: torch.Tensor | None = None
        self.min = self.top = None

    def collect(self, x: torch.Tensor) -> None:
        low, high = self._observe(x.detach().float())
        amax = torch.maximum(-low, high)
        self.amax = amax if self.amax is None else torch.maximum(self.amax, amax)

    def compute_amax(self) -> torch.Tensor:
        assert self.amax is not None
        return self.amax


class HistogramCalibrator(_Range):
    """Histogram of |x| over ``bins`` equal bins from 0 to a power-of-two multiple of the first max.

    When a batch exceeds the range, the range doubles (as often as needed) and neighbouring bins
    merge, so the bin count stays fixed and no count is ever re-estimated.
    """

    def __init__(self, bins: int = 2048) -> None:
        if bins & (bins - 1):
            raise ValueError(f"bins must be a power of two, not {bins}")
        self.bins = bins
        self.reset()

    def reset(self) -> None:
        self.hist: torch.Tensor | None = None
        self.range = 0.0
        self.min = self.top = None

    def collect(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        low, high = self._observe(x)
        top = float(torch.maximum(-low, high))
        x = x.abs().flatten()
        if self.hist is None:
            self.hist = torch.zeros(self.bins, dtype=torch.float64, device=x.device)
        if top <= 0 and self.range == 0:
            self.hist[0] += x.numel()
            return
        if self.range == 0:
            self.range = top
        elif top > self.range:
            self._grow(top)
        index = (x * (self.bins / self.range)).long().clamp_(max=self.bins - 1)
        self.hist += torch.bincount(index, minlength=self.bins)

    def _grow(self, top: float) -> None:
        assert self.hist is not None
        factor = min(2 ** math.ceil(math.log2(top / self.range)), self.bins)
        merged = self.hist.reshape(-1, factor).sum(1)
        self.hist = torch.cat([merged, merged.new_zeros(self.bins - merged.numel())])
        self.range *= factor
        if top > self.range:  # the merge was capped at one bin for everything seen so far
            self._grow(top)

    def compute_amax(self, method: Method, *, percentile: float = 99.99, levels: int = 128) -> torch.Tensor:
        """The clipping range by ``method`` (percentile/entropy/mse) over the collected histogram.

        Args:
            levels: quantization levels above zero: 128 for int8, 256 for uint8 of a non-negative tensor.
                (entropy treats bin 0 of a non-negative tensor as a ReLU zero spike, see search.entropy_amax)
        """
        assert self.hist is not None
        if self.range == 0:
            return torch.zeros((), device=self.hist.device)
        width = self.range / self.bins
        if method is Method.percentile:
            return search.percentile_amax(self.hist, width, percentile)
        if method is Method.entropy:
            return search.entropy_amax(self.hist, width, levels, zero_spike=self.nonneg)
        if method is Method.mse:
            return search.mse_amax(self.hist, width, levels - 1)
        if method is Method.max:
            return search.percentile_amax(self.hist, width, 100.0)
        raise ValueError(f"unknown method {method}")


def make(method: Method) -> MaxCalibrator | HistogramCalibrator:
    return MaxCalibrator() if method is Method.max else HistogramCalibrator()  # auto: every candidate from one
