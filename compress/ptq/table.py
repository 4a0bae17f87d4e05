"""The per-layer calibration table: each activation quantizer's amax against what it saw, and what it clips."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from compress.ptq.calibrators import HistogramCalibrator, MaxCalibrator

# A layer warns when it clips more than 1 % of its values (percentile 99.99 clips 0.01 % by design,
# entropy and mse rarely clip 0.1 %; the old entropy bug clipped 3.6 % of a ReLU6 output), or when
# amax is below half the observed max while clipping more than 0.1 % (the bug's other face: amax
# 0.49 x max clipping 0.53 % of a projection conv's output).
WARN_CLIPPED = 0.01
WARN_RATIO, WARN_RATIO_CLIPPED = 0.5, 0.001


@dataclass(frozen=True)
class LayerCalibration:
    """One activation quantizer's calibration.

    Attributes:
        clipped: share of the calibration values above ``amax``, from the histogram (bins that lie
            wholly above ``amax``: low by at most one bin's count); 0 for ``max``.
        measured_at: ``calibrator: auto`` only: the layers whose outputs the candidates were compared at
            ([]: the tensor itself).
        errors: ``calibrator: auto`` only: each candidate's squared error there, relative to the chosen one's.
    """

    name: str
    method: str
    amax: float
    max: float
    clipped: float
    measured_at: list[str] | None = None
    errors: dict[str, float | None] | None = None  # None: infinitely worse (the chosen one's error is 0)

    @property
    def warning(self) -> str | None:
        """Why this layer's clipping deserves a look, or None."""
        heavy = self.clipped > WARN_CLIPPED
        low = self.amax < WARN_RATIO * self.max and self.clipped > WARN_RATIO_CLIPPED
        if not (heavy or low):
            return None
        return (f"{self.name}: {self.method} clips {100 * self.clipped:.2f} % of calibration values "
                f"(amax {self.amax:.4g} vs observed max {self.max:.4g}); try calibrator percentile or mse")

    def to_dict(self) -> dict[str, object]:
        out = {**asdict(self), "amax": round(self.amax, 6), "max": round(self.max, 6),
               "clipped": round(self.clipped, 6)}
        if self.errors is None:
            del out["errors"], out["measured_at"]
        else:
            out["errors"] = {k: None if v is None else round(v, 4) for k, v in self.errors.items()}
        return out


def clipped_share(cal: MaxCalibrator | HistogramCalibrator, amax: float) -> float:
    """The share of the values ``cal`` saw that lie above ``amax`` (0 for a max calibrator)."""
    if isinstance(cal, MaxCalibrator) or cal.hist is None or cal.range == 0:
        return 0.0
    width = cal.range / cal.bins
    first = max(0, math.ceil(amax / width - 1e-3))  # amax is a bin edge up to float rounding
    total = float(cal.hist.sum())
    return float(cal.hist[first:].sum()) / total if total > 0 else 0.0


def layer_entry(name: str, method: str, cal: MaxCalibrator | HistogramCalibrator, amax: torch.Tensor) -> LayerCalibration:
    """The table row of the quantizer ``name`` calibrated by ``cal`` to ``amax``."""
    value = float(amax)
    top = float(cal.top) if cal.top is not None else 0.0
    return LayerCalibration(name, method, value, top, clipped_share(cal, value))
