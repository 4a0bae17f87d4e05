"""The search for the pruning ratio that meets a latency target: a fixed number of candidates, each timed.

Pure logic: ``build(ratio)`` prunes a copy and ``time(model)`` measures it on the engine, both injected
(:mod:`compress.prune.engine_timer` in the stage and the API, a deterministic function in tests).

The search runs on ``u = -log(1 - ratio)``: a conv net's MACs go as ``(1 - ratio)^2``, so ``u`` is half of
log(MACs reduction) and a bisection on it is a bisection on the MACs reduction in log space. The first
candidate assumes latency goes as MACs; each later one is placed from the measured ratios: extrapolated
(the exponent fitted to the last measurement) until one candidate meets the target, then interpolated
between the closest candidates on either side and kept within the middle half of that bracket, so the
bracket at least halves its width in ``u`` each time (a safeguarded bisection).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

MAX_RATIO = 0.99  # the pruners' bound: a ratio must be < 1
_MACS_EXPONENT = 2.0  # MACs ~ (1 - ratio)^2: a layer's input and output channels both shrink
# ratios tried for one candidate before giving up: ones that cannot be built (a layer would lose every channel) or
# that repeat a timed candidate's channel counts (cheap: a pruned copy and a MACs count each, nothing timed)
_RETRIES = 8


@dataclass(frozen=True)
class Timing:
    """A candidate's latency over the unpruned engine's, from ``runs`` repeated interleaved runs.

    Each run's ratio is the median over its paired rounds (unpruned and candidate back to back);
    ``ratio`` is the median of the runs, ``low``/``high`` their extremes and ``q1``/``q3`` their quartiles.
    """

    ratio: float
    low: float
    high: float
    q1: float
    q3: float
    ms: float  # median ms of the candidate's engine per batch
    unpruned_ms: float  # median ms of the unpruned engine, timed alongside
    runs: tuple[float, ...] = ()

    @classmethod
    def from_runs(cls, run_ratios: Sequence[float], ms: float, unpruned_ms: float) -> Timing:
        runs = list(run_ratios)
        q1, _, q3 = statistics.quantiles(runs, n=4, method="inclusive") if len(runs) > 1 else (runs[0],) * 3
        return cls(statistics.median(runs), min(runs), max(runs), q1, q3, ms, unpruned_ms, tuple(runs))

    @property
    def noise(self) -> float:
        """Half the interquartile range of the runs: how far the median may sit from the true ratio here.

        The quartiles, not the extremes: one run hit by a burst of load elsewhere must not make every
        candidate count as meeting the target."""
        return (self.q3 - self.q1) / 2


@dataclass(frozen=True)
class Probe:
    """A pruned copy at one ratio, before timing."""

    model: nn.Module
    macs: int
    params: int


@dataclass(frozen=True)
class Candidate:
    index: int
    ratio: float  # the pruning ratio asked (fraction of each group's channels)
    macs: int
    params: int
    macs_reduction: float  # MACs unpruned / MACs of this candidate
    timing: Timing
    met: bool  # the median ratio is at most the target plus the measured noise (half the runs' IQR)

    def to_report(self) -> dict[str, Any]:
        t = self.timing
        return {"candidate": self.index, "ratio": round(self.ratio, 4), "macs": self.macs, "params": self.params,
                "macs_reduction": round(self.macs_reduction, 4), "latency_ratio": round(t.ratio, 4),
                "spread": [round(t.low, 4), round(t.high, 4)], "iqr": [round(t.q1, 4), round(t.q3, 4)],
                "runs": [round(r, 4) for r in t.runs],
                "ms": round(t.ms, 4), "unpruned_ms": round(t.unpruned_ms, 4), "met": self.met}


@dataclass
class LatencySearch:
    """What the search found: every candidate in the order timed, and the one chosen.

    ``chosen``: the least pruned candidate whose median ratio is at or below the target; when none is, the
    fastest (the closest to the target), which may still meet it within its noise. ``met``: the chosen one
    meets the target within its noise.
    """

    target: float
    budget: int  # candidates allowed
    macs_before: int
    params_before: int
    candidates: list[Candidate] = field(default_factory=list)
    stopped: str | None = None  # why fewer than ``budget`` candidates were timed
    seconds: float = 0.0
    engine: dict[str, Any] = field(default_factory=dict)  # how the engines were built and timed
    model: nn.Module | None = field(default=None, repr=False)  # the pruned model (the API's result)
    # the model the stage left, timed again when it was pruned in several steps: with fine-tuning between
    # steps (and scope global) its channel counts may differ from the candidate the search timed
    final: Candidate | None = None

    @property
    def chosen(self) -> Candidate | None:
        below = [c for c in self.candidates if c.timing.ratio <= self.target]
        if below:
            return min(below, key=lambda c: (c.ratio, c.index))
        return min(self.candidates, key=lambda c: (c.timing.ratio, c.index), default=None)

    @property
    def met(self) -> bool:
        chosen = self.chosen
        return chosen is not None and chosen.met

    def to_report(self) -> dict[str, Any]:
        chosen = self.chosen
        return {
            "target": self.target, "met": self.met, "candidates": self.budget, "timed": len(self.candidates),
            "stopped": self.stopped, "chosen": chosen.index if chosen else None,
            "ratio": round(chosen.ratio, 4) if chosen else None,
            "latency_ratio": round(chosen.timing.ratio, 4) if chosen else None,
            "spread": [round(chosen.timing.low, 4), round(chosen.timing.high, 4)] if chosen else None,
            "noise": round(chosen.timing.noise, 4) if chosen else None,
            "gap": round(chosen.timing.ratio - self.target, 4) if chosen else None,
            "macs_reduction": round(chosen.macs_reduction, 4) if chosen else None,
            "macs_before": self.macs_before, "params_before": self.params_before,
            "seconds": round(self.seconds, 2), "engine": self.engine,
            "path": [c.to_report() for c in self.candidates],
        } | ({"final": self.final.to_report()} if self.final is not None else {})

    def summary(self) -> str:
        """One line: target, outcome, the chosen candidate's measured ratio with its spread and MACs."""
        c = self.chosen
        if c is None:
            return f"latency target {self.target:g}: no candidate timed ({self.stopped})"
        t = c.timing
        outcome = "met" if self.met else f"NOT met (closest {t.ratio:.3f}, {t.ratio - self.target:+.3f})"
        line = (f"latency target {self.target:g}: {outcome}; candidate {c.index} of {len(self.candidates)}: ratio "
                f"{c.ratio:.3f}, engine x{t.ratio:.3f} (runs {t.low:.3f}-{t.high:.3f}, IQR {t.q1:.3f}-{t.q3:.3f}), "
                f"MACs / {c.macs_reduction:.2f}, {t.ms:.3f} ms vs {t.unpruned_ms:.3f} ms")
        if self.final is not None:
            f = self.final.timing
            line += (f"; the model left after the steps: engine x{f.ratio:.3f} (runs {f.low:.3f}-{f.high:.3f}), "
                     f"MACs / {self.final.macs_reduction:.2f}, {'met' if self.final.met else 'NOT met'}")
        return line


def _u(ratio: float) -> float:
    return -math.log(1.0 - ratio)


def _ratio(u: float) -> float:
    return 1.0 - math.exp(-u)


def first_ratio(target: float) -> float:
    """The first candidate's ratio: latency assumed to go as MACs, ``(1 - ratio)^2``."""
    return _ratio(-math.log(target) / _MACS_EXPONENT)


@dataclass(frozen=True)
class _Point:
    u: float
    q: float  # measured latency ratio (median)


def _propose(lo: _Point, hi: _Point | None, target: float, u_max: float) -> float:
    """The next ``u``: extrapolated from ``lo`` (latency ~ (1-ratio)^a, ``a`` fitted) until the target is
    bracketed, then interpolated in log latency and kept within the middle half of ``[lo, hi]``."""
    if hi is None:
        exponent = -math.log(lo.q) / lo.u if lo.u > 0 and 0 < lo.q < 1 else _MACS_EXPONENT
        exponent = min(max(exponent, 0.25), 4.0)  # a flat or noisy first measurement must not stall or leap
        u = -math.log(target) / exponent
        if u <= lo.u * 1.05:  # measured slower than the fit says: step on at least by a quarter
            u = lo.u * 1.25 + 0.05
        return min(u, u_max)
    width = hi.u - lo.u
    if lo.q > 0 and hi.q > 0 and math.log(lo.q) != math.log(hi.q):
        u = lo.u + (math.log(target) - math.log(lo.q)) / (math.log(hi.q) - math.log(lo.q)) * width
    else:
        u = lo.u + width / 2
    return min(max(u, lo.u + width / 4), hi.u - width / 4)


def search(build: Callable[[float], Probe | None], time: Callable[[nn.Module], Timing], target: float,
           candidates: int, macs_before: int, params_before: int, *, max_ratio: float = MAX_RATIO) -> LatencySearch:
    """Time exactly ``candidates`` pruned copies, each with channel counts of its own (fewer only when no ratio
    left in the bracket gives new counts, or the most pruning possible is still too slow), and keep the least
    pruned at or below ``target``, else the fastest (:attr:`LatencySearch.chosen`).

    ``build(ratio)`` returns a pruned copy, or None when that ratio cannot be built (too far).
    """
    result = LatencySearch(target, candidates, macs_before, params_before)
    lo, hi = _Point(0.0, 1.0), None
    u_max = _u(max_ratio)
    timed: dict[int, tuple[int, float]] = {}  # MACs -> (candidate, u): equal MACs, equal channel counts
    while len(result.candidates) < candidates:
        if hi is None and lo.u >= u_max:
            result.stopped = f"the most pruning possible (ratio {_ratio(u_max):.3f}) is slower than the target"
            break
        u, probe, why = _propose(lo, hi, target, u_max), None, ""
        for _ in range(_RETRIES):
            probe = build(_ratio(u))
            if probe is None:  # too far: every channel of a layer would go; halve the step
                u_max = u = lo.u + (u - lo.u) / 2
                why = f"no ratio above {_ratio(lo.u):.3f} can be pruned to"
            elif probe.macs in timed:  # a timed candidate's channel counts: halfway to the other end of the bracket
                index, seen = timed[probe.macs]
                why = (f"the next ratio ({_ratio(u):.3f}) prunes to the same channel counts as candidate {index}: "
                       "the search has converged at this rounding")
                u, probe = ((lo.u + u) / 2 if seen >= u else (u + (hi.u if hi is not None else u_max)) / 2), None
            else:
                break
        if probe is None:
            result.stopped = why
            break
        timing = time(probe.model)
        index = len(result.candidates)
        timed[probe.macs] = (index, u)
        result.candidates.append(Candidate(index, _ratio(u), probe.macs, probe.params,
                                           macs_before / max(probe.macs, 1), timing,
                                           met=timing.ratio <= target + timing.noise))
        point = _Point(u, timing.ratio)  # a noisy, non-monotone measurement never inverts the bracket
        if timing.ratio <= target:
            hi = point if hi is None or lo.u < point.u < hi.u else hi
        elif point.u > lo.u and (hi is None or point.u < hi.u):
            lo = point
    return result
