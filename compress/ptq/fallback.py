"""``fallback``: keep the most sensitive units of a quantized model in float until an accuracy budget is met.

Greedy on the :mod:`compress.ptq.sensitivity` table: units in order of recovery (most first; the fewest
MACs first among equals) go float one more at a time, each step measured on the same (validation) data,
until the metric is within ``max_drop`` points of the float model's. Each step is recorded: the units in
float, the metric, the drop and the share of MACs still INT8. A budget that cannot be met (``max_units``
reached) is not an error: the closest step is kept and the result says by how much it misses.

With ``engine`` (a function building a deployable engine from the model as it stands), every step the
fake-quant model says meets the budget is confirmed on that engine; while the engine misses, the search
goes on (the engine's figure decides, the fake-quant one only says when to start asking it).

The units kept float are recorded on the model (:func:`compress.quant.keep_float`): checkpoints rebuild
them float and ONNX export writes no Q/DQ for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from compress import metrics
from compress.errors import CompressError
from compress.metrics import Runner
from compress.ptq.sensitivity import Scorer, Sensitivity, check_reiterable, measure, points, quantized_units
from compress.quant import keep_float, quantizing


@dataclass(frozen=True)
class Step:
    """The model after one step of the search."""

    float_units: list[str]  # every unit in float so far, in the order they went
    score: float  # the metric (a fraction)
    drop: float  # points below the float model
    int8_macs_share: float  # MACs of the units still INT8 / the model's MACs (per sample)
    fidelity: float  # cosine of the task output with the float model's
    engine_score: float | None = None  # the metric on the engine (steps confirmed there)
    engine_drop: float | None = None  # points below the float model, on the engine

    @property
    def decisive_drop(self) -> float:
        """The engine's drop where it was measured, else the fake-quant model's."""
        return self.drop if self.engine_drop is None else self.engine_drop

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Fallback:
    """What :func:`fallback` did: the sensitivity table, every step, and which one the model was left at."""

    max_drop: float
    sensitivity: Sensitivity
    steps: list[Step] = field(default_factory=list)
    kept: int = 0  # index into steps
    passes: int = 0  # forward passes over the data this time, sensitivity included
    seconds: float = 0.0
    resumed: bool = False  # the table (and the steps it could) came from a saved search

    @property
    def step(self) -> Step:
        """The step the model was left at."""
        return self.steps[self.kept]

    @property
    def met(self) -> bool:
        return self.step.decisive_drop <= self.max_drop

    @property
    def gap(self) -> float:
        """Points by which the kept model misses the budget (0 when met)."""
        return round(max(0.0, self.step.decisive_drop - self.max_drop), 4)

    def summary(self) -> str:
        """One line: met or not, the drop, the units in float and the INT8 share."""
        s = self.step
        head = (f"budget {self.max_drop} pt met" if self.met else
                f"budget {self.max_drop} pt not met (closest: {self.gap} pt over)")
        engine = "" if s.engine_drop is None else f" (engine {s.engine_drop} pt)"
        return (f"{head}: drop {s.drop} pt{engine} with {len(s.float_units)} unit(s) float "
                f"({', '.join(s.float_units) or 'none'}), {s.int8_macs_share:.1%} of MACs INT8")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fallback:
        """The inverse of :meth:`to_dict` (a search saved by ``on_step``).

        Raises:
            KeyError, TypeError: ``d`` is not what :meth:`to_dict` wrote.
        """
        steps = [Step(**p) for p in d["path"]]
        return cls(d["max_drop"], Sensitivity.from_dict(d["sensitivity"]), steps, d["kept_step"], d["passes"],
                   d["seconds"], d.get("resumed", False))

    def to_dict(self) -> dict[str, Any]:
        return {"max_drop": self.max_drop, "metric": self.sensitivity.metric, "met": self.met, "gap": self.gap,
                "float_units": self.step.float_units, "drop": self.step.drop, "engine_drop": self.step.engine_drop,
                "int8_macs_share": self.step.int8_macs_share, "kept_step": self.kept, "passes": self.passes,
                "seconds": self.seconds, "resumed": self.resumed, "path": [s.to_dict() for s in self.steps],
                "sensitivity": self.sensitivity.to_dict()}


def _reusable(saved: Fallback | None, found: list, metric: str) -> Fallback | None:
    """``saved`` if it was measured on these units with this metric, else None."""
    if saved is None or saved.sensitivity.metric != metric:
        return None
    return saved if [r.name for r in saved.sensitivity.rows] == [u.name for u in found] else None


def _share(sens: Sensitivity, floated: set[str]) -> float:
    int8 = sum(r.macs for r in sens.rows if r.name not in floated)
    return round(int8 / sens.macs, 4) if sens.macs else 0.0


@torch.no_grad()
def fallback(
    qmodel: nn.Module,
    data: Iterable[Any],
    max_drop: float,
    metric: str = "top1",
    *,
    output: str | None = None,
    max_units: int | None = None,
    announce: Callable[[str], None] | None = None,
    on_step: Callable[[Fallback], None] | None = None,
    engine: Callable[[nn.Module], Runner] | None = None,
    resume: Fallback | None = None,
) -> Fallback:
    """Keep units float (in place) until the metric on ``data`` is within ``max_drop`` points of the float model's.

    Args:
        data: validation batches (a DataLoader or a list), never the split the model is reported on.
        max_drop: the budget, in points (0.3 = 0.3 percentage points of top-1).
        metric: as for :func:`compress.ptq.sensitivity.sensitivity`.
        max_units: at most this many units go float (default: no limit, so a budget is always met, at worst
            by the float model).
        announce: called with one line stating the cost before the first pass.
        on_step: called with the search so far after each measured step (``kept`` is its last step): save it,
            and pass it back as ``resume`` to go on from there after an interruption.
        engine: ``model -> runner``: builds an engine (an ONNX Runtime session, say) from the model in the
            step's state; each step the fake-quant model says meets the budget is measured on it (one pass
            each) and the engine's drop decides.
        resume: a search saved by ``on_step`` (:meth:`Fallback.from_dict`): its table and steps are reused
            where they fit this model (the same units and metric), so only the rest is measured.

    Returns:
        The table, the search path and the step the model is left at; ``met`` False and ``gap`` say how far
        a budget that could not be met was missed.

    Raises:
        CompressError: ``max_drop`` below 0, ``max_units`` below 0; and as :func:`sensitivity`.
    """
    if not max_drop >= 0:
        raise CompressError(f"fallback: max_drop must be at least 0 points, not {max_drop}")
    if max_units is not None and max_units < 0:
        raise CompressError(f"fallback: max_units must be at least 0, not {max_units}")
    start = time.perf_counter()
    found = quantized_units(qmodel, "fallback")
    check_reiterable(data)
    limit = len(found) if max_units is None else min(max_units, len(found))
    if announce is not None:
        announce(f"fallback: {len(found)} quantized units: {2 * len(found) + 2} forward passes over the data for "
                 f"the sensitivity table, then up to {limit} more (one per unit put in float)")
    scorer = Scorer(qmodel, data, metric, found, output)
    reused = _reusable(resume, found, metric)
    sens = reused.sensitivity if reused is not None else measure(scorer)
    done = list(reused.steps) if reused is not None else []
    steps: list[Step] = []

    def record(step: Step, floated: list[str]) -> Step:
        if engine is not None and step.drop <= max_drop and step.engine_drop is None:
            with quantizing(qmodel, [u for u in found if u.name not in floated], found):
                runner = engine(qmodel)
            result = metrics.score(metric, metrics.collect(runner, data, name="the engine", output=output),
                                   scorer.float_reference())
            scorer.passes += 1
            step = replace(step, engine_score=result[metric], engine_drop=points(sens.float_score - result[metric]))
        steps.append(step)
        if on_step is not None:
            on_step(Fallback(max_drop, sens, list(steps), len(steps) - 1, scorer.passes,
                             round(time.perf_counter() - start, 3), resumed=reused is not None))
        return step

    def measured(floated: list[str]) -> Step:
        if len(done) > len(steps) and done[len(steps)].float_units == floated:
            return done[len(steps)]
        score, fid = scorer.score([u for u in found if u.name not in floated])
        return Step(list(floated), score, points(sens.float_score - score), _share(sens, set(floated)), round(fid, 6))

    first = done[0] if done else Step([], sens.int8_score, sens.drop, _share(sens, set()), sens.int8_fidelity)
    last = record(first, [])
    floated: list[str] = []
    for row in sens.ranked()[:limit]:
        if last.decisive_drop <= max_drop:
            break
        floated.append(row.name)
        last = record(measured(floated), floated)
    met = [i for i, s in enumerate(steps) if s.decisive_drop <= max_drop]
    kept = met[0] if met else min(range(len(steps)), key=lambda i: (steps[i].decisive_drop, i))
    keep_float(qmodel, steps[kept].float_units)
    return Fallback(max_drop, sens, steps, kept, scorer.passes, round(time.perf_counter() - start, 3),
                    resumed=reused is not None)

