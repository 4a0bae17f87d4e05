"""Gradual magnitude pruning schedule (Zhu & Gupta 2017, the SparseML GMP way)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from compress.errors import CompressError, parse_enum


class Curve(str, Enum):
    cubic = "cubic"  # fast early, gentle at the end: s_k = end + (start - end) * (1 - k / (steps - 1))^3
    linear = "linear"


@dataclass(frozen=True)
class Schedule:
    """``steps`` pruning updates from ``start_ratio`` to ``end_ratio`` over a fine-tune.

    Attributes:
        steps: number of mask updates (1 = one-shot at ``end_ratio``).
        start_ratio/end_ratio: fraction of weights pruned at the first/last update, in [0, 1).
        curve: how the ratio moves between them.
        end_at: fraction of the fine-tune's optimizer steps by which ``end_ratio`` is reached; the
            rest of the fine-tune trains at ``end_ratio`` to recover.
    """

    steps: int
    start_ratio: float
    end_ratio: float
    curve: Curve = Curve.cubic
    end_at: float = 0.75

    def check(self, where: str) -> None:
        """Raises CompressError for a field out of range (the recipe schema checks the same)."""
        problems = {"steps": self.steps >= 1, "start_ratio": 0 <= self.start_ratio < 1,
                    "end_ratio": 0 <= self.end_ratio < 1, "end_at": 0 < self.end_at <= 1}
        for key, ok in problems.items():
            if not ok:
                raise CompressError(f"{where}.{key}: {getattr(self, key)} is out of range")
        parse_enum(Curve, self.curve, f"{where}.curve")

    def ratio(self, k: int) -> float:
        """The pruning ratio of update ``k`` (0-based)."""
        if self.steps <= 1:
            return self.end_ratio
        t = min(max(k / (self.steps - 1), 0.0), 1.0)
        if Curve(self.curve) is Curve.cubic:
            return self.end_ratio + (self.start_ratio - self.end_ratio) * (1.0 - t) ** 3
        return self.start_ratio + (self.end_ratio - self.start_ratio) * t

    def updates(self, total_steps: int) -> dict[int, float]:
        """``{optimizer step: ratio}``: update 0 before the first step, the last at ``end_at`` of training."""
        span = int(self.end_at * max(total_steps - 1, 0))
        if self.steps <= 1:
            return {0: self.end_ratio}
        points: dict[int, float] = {}
        for k in range(self.steps):
            points[round(k * span / (self.steps - 1))] = self.ratio(k)  # a later update wins a shared step
        return points
