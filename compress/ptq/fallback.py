"""``fallback``: keep the most sensitive units of a quantized model in float until an accuracy budget is met.

The validation data is split first (:mod:`compress.ptq.confirm`, ``confirm`` share, default half): a *search*
part, the only data that chooses anything, and a *confirm* part that only says whether a step meets the budget.

1. The all-INT8 model is measured on both parts (and, with ``engine``, on the engine): when it meets the budget
   the search stops there, and no per-unit table is measured (4 passes, 5 with the engine).
2. Otherwise the :mod:`compress.ptq.sensitivity` table on the search part ranks the units, and greedily the units
   in order of harm (:func:`compress.ptq.sensitivity.harm`, the larger of recovery alone and drop alone, most
   first; the fewest MACs first among equals) go float one more at a time, each step
   measured on both parts (2 passes), until a step meets the budget.

A step *meets* the budget when its drop (points below the float model, each part against the float model on
that part) is within ``max_drop`` on the search part and on the confirm part, and, with ``engine`` (a function
building a deployable engine from the model as it stands), on that engine run over the confirm part; the engine
is asked only once both parts meet. Each step is recorded: the units in float, both drops, the share of MACs still
INT8. A budget that cannot be met (``max_units`` reached) is not an error: the closest step is kept (the smallest
worst drop) and the result says by how much it misses.

Why the plain drop on the confirm part, with no allowance for noise either way: the confirm part chose no unit, so
its drop is an unbiased estimate of the drop on unseen data (up to the mild optimism of stopping at the first
step it accepts); subtracting a confidence margin would make a budget below a few samples unreachable short of
the float model (and cost MACs for nothing on large data), adding slack would break the promise. Its noise is
reported instead (``sample_pt``: one confirm sample in points) and a budget finer than one sample is warned about.

The units kept float are recorded on the model (:func:`compress.quant.keep_float`): checkpoints rebuild
them float and ONNX export writes no Q/DQ for them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from compress import metrics
from compress.errors import CompressError
from compress.metrics import Runner
from compress.ptq.confirm import SHARE, Split, split
from compress.ptq.sensitivity import Scorer, Sensitivity, check_reiterable, ends, measure_rows, points, quantized_units
from compress.quant import Unit, keep_float, quantizing

log = logging.getLogger("compress")


@dataclass(frozen=True)
class Step:
    """The model after one step of the search."""

    float_units: list[str]  # every unit in float so far, in the order they went
    score: float  # the metric (a fraction) on the search part
    drop: float  # points below the float model, on the search part
    int8_macs_share: float  # MACs of the units still INT8 / the model's MACs (per sample)
    fidelity: float  # cosine of the task output with the float model's, on the search part
    engine_score: float | None = None  # the metric on the engine, over the confirm part (steps confirmed there)
    engine_drop: float | None = None  # points below the float model, on the engine
    confirm_score: float | None = None  # the metric on the confirm part (None: no confirm part)
    confirm_drop: float | None = None  # points below the float model on the confirm part

    @property
    def decisive_drop(self) -> float:
        """The worst of the drops measured (search part, confirm part, engine): every one must meet the budget."""
        return max(d for d in (self.drop, self.confirm_drop, self.engine_drop) if d is not None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Fallback:
    """What :func:`fallback` did: the sensitivity table (on the search part), every step, and the step kept."""

    max_drop: float
    sensitivity: Sensitivity  # measured only when the all-INT8 model missed (``sensitivity.measured``)
    steps: list[Step] = field(default_factory=list)
    kept: int = 0  # index into steps
    passes: int = 0  # forward passes over either part this time (sensitivity and engine included)
    seconds: float = 0.0
    resumed: bool = False  # the table (and the steps it could) came from a saved search
    confirm_share: float = 0.0  # share of the data held out to confirm (0: none)
    confirm_samples: int = 0
    confirm_float: float | None = None  # the float model's metric on the confirm part
    engine: bool = False  # a step meets the budget only with the engine's figure

    @property
    def step(self) -> Step:
        """The step the model was left at."""
        return self.steps[self.kept]

    @property
    def sample_pt(self) -> float | None:
        """One confirm sample in points (of top-1, agreement: metrics counted per sample); None without a part."""
        return round(100.0 / self.confirm_samples, 4) if self.confirm_samples else None

    def meets(self, step: Step) -> bool:
        """Whether ``step`` meets the budget: every figure it needs measured and within ``max_drop``."""
        return (step.decisive_drop <= self.max_drop and (not self.confirm_samples or step.confirm_drop is not None)
                and (not self.engine or step.engine_drop is not None))

    @property
    def met(self) -> bool:
        return self.meets(self.step)

    @property
    def gap(self) -> float:
        """Points by which the kept model misses the budget (0 when met)."""
        return round(max(0.0, self.step.decisive_drop - self.max_drop), 4)

    def resolution(self) -> str:
        """``confirm: 180 samples, 1 sample = 0.5556 pt`` (or that nothing was held out)."""
        if not self.confirm_samples:
            return ("confirm: none (confirm 0: the budget is checked on the data that chose the units, so expect "
                    "a larger drop on unseen data)")
        return f"confirm: {self.confirm_samples} samples, 1 sample = {self.sample_pt:g} pt"

    def too_fine(self) -> str | None:
        """A warning when ``max_drop`` is below one confirm sample (the budget then means: no sample lost)."""
        return too_fine(self.max_drop, self.confirm_samples)

    def summary(self) -> str:
        """One line: met or not, the drops, the units in float and the INT8 share."""
        s = self.step
        head = (f"budget {self.max_drop} pt met" if self.met else
                f"budget {self.max_drop} pt not met (closest: {self.gap} pt over)")
        confirm = "" if s.confirm_drop is None else f", confirm {s.confirm_drop} pt"
        engine = "" if s.engine_drop is None else f", engine {s.engine_drop} pt"
        return (f"{head}: drop search {s.drop} pt{confirm}{engine} with {len(s.float_units)} unit(s) float "
                f"({', '.join(s.float_units) or 'none'}), {s.int8_macs_share:.1%} of MACs INT8")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fallback:
        """The inverse of :meth:`to_dict` (a search saved by ``on_step``).

        Raises:
            KeyError, TypeError: ``d`` is not what :meth:`to_dict` wrote.
        """
        steps = [Step(**p) for p in d["path"]]
        c = d.get("confirm") or {}
        return cls(d["max_drop"], Sensitivity.from_dict(d["sensitivity"]), steps, d["kept_step"], d["passes"],
                   d["seconds"], d.get("resumed", False), c.get("share", 0.0), c.get("samples", 0), c.get("float"),
                   d.get("engine", False))

    def to_dict(self) -> dict[str, Any]:
        s = self.step
        return {"max_drop": self.max_drop, "metric": self.sensitivity.metric, "met": self.met, "gap": self.gap,
                "float_units": s.float_units, "drop": s.drop, "confirm_drop": s.confirm_drop,
                "engine_drop": s.engine_drop, "int8_macs_share": s.int8_macs_share, "kept_step": self.kept,
                "passes": self.passes, "seconds": self.seconds, "resumed": self.resumed, "engine": self.engine,
                "search": {"samples": self.sensitivity.samples, "float": self.sensitivity.float_score,
                           "drop": s.drop},
                "confirm": {"share": self.confirm_share, "samples": self.confirm_samples, "sample_pt": self.sample_pt,
                            "float": self.confirm_float, "drop": s.confirm_drop, "engine_drop": s.engine_drop,
                            "warning": self.too_fine()},
                "path": [p.to_dict() for p in self.steps], "sensitivity": self.sensitivity.to_dict()}


def too_fine(max_drop: float, confirm_samples: int) -> str | None:
    """The warning :meth:`Fallback.too_fine` gives, or None (also None without a confirm part)."""
    if not confirm_samples or max_drop >= 100.0 / confirm_samples:
        return None
    return (f"max_drop {max_drop} pt is below one sample of the confirm part ({round(100.0 / confirm_samples, 4):g} "
            f"pt of {confirm_samples} samples): met means no sample lost net on it; give data.val more samples for "
            "a finer budget")


def _reusable(saved: Fallback | None, found: list, metric: str, parts: Split) -> Fallback | None:
    """``saved`` if it was measured on these units with this metric and the same split, else None."""
    if saved is None or saved.sensitivity.metric != metric:
        return None
    if (saved.confirm_share, saved.confirm_samples, saved.sensitivity.samples) != \
            (parts.share, parts.confirm_samples, parts.search_samples):
        return None
    return saved if [r.name for r in saved.sensitivity.rows] == [u.name for u in found] else None


def _share(sens: Sensitivity, floated: set[str]) -> float:
    int8 = sum(r.macs for r in sens.rows if r.name not in floated)
    return round(int8 / sens.macs, 4) if sens.macs else 0.0


def _int8(found: list[Unit], floated: list[str]) -> list[Unit]:
    return [u for u in found if u.name not in floated]


@torch.no_grad()
def fallback(
    qmodel: nn.Module,
    data: Iterable[Any],
    max_drop: float,
    metric: str = "top1",
    *,
    output: str | None = None,
    max_units: int | None = None,
    confirm: float = SHARE,
    announce: Callable[[str], None] | None = None,
    on_step: Callable[[Fallback], None] | None = None,
    engine: Callable[[nn.Module], Runner] | None = None,
    resume: Fallback | None = None,
    reference: nn.Module | None = None,
) -> Fallback:
    """Keep units float (in place) until the metric is within ``max_drop`` points of the float model's on both
    parts of ``data`` (see the module docstring).

    Args:
        data: validation batches (a DataLoader or a list, yielding the same samples in the same order each pass:
            the parts are by position), never the split the model is reported on.
        max_drop: the budget, in points (0.3 = 0.3 percentage points of top-1).
        metric: as for :func:`compress.ptq.sensitivity.sensitivity`.
        max_units: at most this many units go float (default: no limit, so a budget is always met, at worst
            by the float model, on both parts).
        confirm: the share of ``data`` held out to confirm each step (:mod:`compress.ptq.confirm`: every
            ``1/confirm``-th sample, deterministic); the table and the greedy order use only the rest. Default
            0.5: the check gets the same resolution as the search. 0: no confirm part (the budget is then met on
            the data that chose the units, an optimistic figure on a small ``data``).
        announce: called with one line stating the cost before the first pass.
        on_step: called with the search so far after each measured step and after the table (``kept`` is its
            last step): save it, and pass it back as ``resume`` to go on from there after an interruption.
        engine: ``model -> runner``: builds an engine (an ONNX Runtime session, say) from the model in the
            step's state; each step both parts say meets the budget is measured on it over the confirm part (one
            pass each) and must meet it too.
        resume: a search saved by ``on_step`` (:meth:`Fallback.from_dict`): its table and steps are reused
            where they fit this model (the same units, metric and split), so only the rest is measured.
        reference: the float model the drop is measured against. Default: ``qmodel`` with every unit float,
            right after PTQ. After QAT pass the model before it: the fine-tuned weights co-adapted with their
            quantizers, and in float they may score far below it.

    Returns:
        The table, the search path and the step the model is left at; ``met`` False and ``gap`` say how far
        a budget that could not be met was missed. One warning is logged when ``max_drop`` is below one sample
        of the confirm part (:meth:`Fallback.too_fine`).

    Raises:
        CompressError: ``max_drop`` below 0, ``max_units`` below 0, ``confirm`` outside [0, 1);
            :class:`compress.ptq.confirm.SplitTooSmall` when ``data`` is too small for both parts to hold a
            sample; and as :func:`sensitivity`.
    """
    if not max_drop >= 0:
        raise CompressError(f"fallback: max_drop must be at least 0 points, not {max_drop}")
    if max_units is not None and max_units < 0:
        raise CompressError(f"fallback: max_units must be at least 0, not {max_units}")
    start = time.perf_counter()
    found = quantized_units(qmodel, "fallback")
    check_reiterable(data)
    parts = split(data, confirm)
    limit = len(found) if max_units is None else min(max_units, len(found))
    both = parts.confirm is not None
    if announce is not None:
        engine_pass = " + 1 on the engine" if engine is not None else ""
        announce(f"fallback: {len(found)} quantized units; data: {parts.search_samples} samples to search, "
                 f"{parts.confirm_samples} to confirm; the all-INT8 model first ({4 if both else 2} passes"
                 f"{engine_pass}); if it misses the budget, the sensitivity table ({2 * len(found)} passes over the "
                 f"search part), then up to {limit} steps of {2 if both else 1} pass(es), one unit more in float each")
    warning = too_fine(max_drop, parts.confirm_samples)
    if warning is not None:  # once, before the first pass
        log.warning("fallback: %s", warning)
    search = Scorer(qmodel, parts.search, metric, found, output, reference)
    check = Scorer(qmodel, parts.confirm, metric, found, output, reference) if parts.confirm is not None else None
    judge = check or search  # the data the engine is measured on
    reused = _reusable(resume, found, metric, parts)
    sens = reused.sensitivity if reused is not None else ends(search)
    done = list(reused.steps) if reused is not None else []
    engine_passes = 0
    confirm_float = reused.confirm_float if reused is not None else None
    steps: list[Step] = []

    def result(kept: int) -> Fallback:
        return Fallback(max_drop, sens, list(steps), kept, search.passes + (check.passes if check else 0)
                        + engine_passes, round(time.perf_counter() - start, 3), reused is not None,
                        parts.share, parts.confirm_samples, confirm_float, engine is not None)

    def complete(step: Step) -> Step:
        """``step`` with the figures it lacks: the confirm part's, then the engine's where both parts meet."""
        nonlocal engine_passes, confirm_float
        int8 = _int8(found, step.float_units)
        if check is not None and step.confirm_drop is None:
            score, _ = check.score(int8)
            if confirm_float is None:  # the float model's own score there: the same every step
                ref = check.float_reference()
                confirm_float = metrics.score(metric, ref, ref)[metric]
            step = replace(step, confirm_score=score, confirm_drop=points(confirm_float - score))
        if engine is not None and step.engine_drop is None and step.decisive_drop <= max_drop:
            with quantizing(qmodel, int8, found):
                runner = engine(qmodel)
            reference = judge.float_reference()
            scored = metrics.score(metric, metrics.collect(runner, judge.data, name="the engine", output=output),
                                   reference)
            engine_passes += 1
            base = confirm_float if check is not None and confirm_float is not None else \
                metrics.score(metric, reference, reference)[metric]
            step = replace(step, engine_score=scored[metric], engine_drop=points(base - scored[metric]))
        return step

    def record(step: Step) -> Step:
        steps.append(complete(step))
        if on_step is not None:
            on_step(result(len(steps) - 1))
        return steps[-1]

    def measured(floated: list[str]) -> Step:
        if len(done) > len(steps) and done[len(steps)].float_units == floated:
            return done[len(steps)]
        score, fid = search.score(_int8(found, floated))
        return Step(list(floated), score, points(sens.float_score - score), _share(sens, set(floated)), round(fid, 6))

    first = done[0] if done else Step([], sens.int8_score, sens.drop, _share(sens, set()), sens.int8_fidelity)
    last = record(first)
    if not result(0).meets(last) and limit > 0:
        if not sens.measured:  # the all-INT8 model missed: now the table is needed to rank the units
            sens = measure_rows(search, sens)
            if on_step is not None:  # saved at once: an interruption during the steps does not measure it again
                on_step(result(len(steps) - 1))
        floated: list[str] = []
        for row in sens.ranked()[:limit]:
            floated.append(row.name)
            last = record(measured(floated))
            if result(0).meets(last):
                break
    probe = result(0)
    met = [i for i, s in enumerate(steps) if probe.meets(s)]
    kept = met[0] if met else min(range(len(steps)), key=lambda i: (steps[i].decisive_drop, i))
    keep_float(qmodel, steps[kept].float_units)
    return result(kept)
