"""``sensitivity``: how much each quantized unit of a model costs in the task metric, and what keeping it float buys.

For every unit (:func:`compress.quant.units`: a layer with its own quantizers, an attention's MatMul
quantizers, a residual add's or a shared tensor's quantizers) two runs over the data:

- *alone INT8*: only this unit quantized, the rest float: ``drop_alone`` = float metric - this, in points;
- *alone float*: every unit quantized but this one: ``recovery_alone`` = this - all-INT8 metric, in points.

Plus one float pass (its outputs are the reference for the label-free fidelity, kept once) and one
all-INT8 pass: ``2 * units + 2`` passes over the data in all, known (and announced) before the first.
Metric values are fractions; drops and recoveries are in points (0.5 = half a percentage point).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from compress import metrics
from compress.data import split_batch
from compress.errors import CompressError, DataError
from compress.inputs import move_inputs
from compress.profile import profile_macs
from compress.quant import Unit, is_quantized, quantizing, units

FIDELITY = "cosine"  # the label-free column: mean per-sample cosine of the task output with the float model's


def points(fraction: float) -> float:
    """A metric difference as points (0.005 -> 0.5)."""
    return round(fraction * 100.0, 4)


@dataclass(frozen=True)
class UnitSensitivity:
    """One row of the table."""

    name: str
    kind: str  # layer, attention, graph (see compress.quant.units)
    macs: int  # per sample, of the module it quantizes (0 for graph units)
    # None: not measured (a budget the all-INT8 model met needs no table; only names and MACs are known)
    drop_alone: float | None  # points lost with only this unit INT8
    recovery_alone: float | None  # points won back with only this unit float
    fidelity_alone: float | None  # cosine with the float outputs, only this unit INT8
    fidelity_float: float | None  # cosine with the float outputs, every unit INT8 but this one

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Sensitivity:
    """What :func:`sensitivity` measured: the reference scores, the cost, and one row per unit."""

    metric: str
    float_score: float  # the metric, every unit float
    int8_score: float  # the metric, every unit INT8
    samples: int
    passes: int
    seconds: float
    macs: int  # per sample, the whole model
    int8_fidelity: float = 1.0  # cosine with the float outputs, every unit INT8
    rows: list[UnitSensitivity] = field(default_factory=list)

    @property
    def drop(self) -> float:
        """Points lost by quantizing every unit."""
        return points(self.float_score - self.int8_score)

    @property
    def measured(self) -> bool:
        """Whether the per-unit figures were measured (else the rows hold names, kinds and MACs only)."""
        return all(r.recovery_alone is not None for r in self.rows)

    def ranked(self) -> list[UnitSensitivity]:
        """Rows by harm (most first), :func:`harm`; among equals the cheapest (fewest MACs) first, then the one
        whose float leaves the outputs closest to the float model's (a task metric on few samples ties often)."""
        return sorted(self.rows, key=lambda r: (-harm(r.recovery_alone, r.drop_alone), r.macs, -r.fidelity_float,
                                                r.name))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sensitivity:
        """The inverse of :meth:`to_dict` (a saved search resumed).

        Raises:
            KeyError, TypeError: ``d`` is not what :meth:`to_dict` wrote.
        """
        rows = [UnitSensitivity(**r) for r in d["layers"]]
        return cls(d["metric"], d["float"], d["int8"], d["samples"], d["passes"], d["seconds"], d["macs"],
                   d["int8_fidelity"], rows)

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "fidelity": FIDELITY, "float": self.float_score, "int8": self.int8_score,
                "drop": self.drop, "int8_fidelity": self.int8_fidelity, "samples": self.samples, "passes": self.passes, "seconds": self.seconds,
                "macs": self.macs, "measured": self.measured, "layers": [r.to_dict() for r in self.rows]}


def harm(recovery_alone: float, drop_alone: float) -> float:
    """The evidence that a unit hurts: the larger of what its float wins back and what it costs alone.

    Recovery alone is blind when several units each break the model on their own: with one float the others
    still break it, so every recovery is noise (vit_tiny on hard digits: five graph quantizers each cost 20-63 pt
    alone, all recover within +-4 pt; ranked by recovery the search floated all 31 units, ranked by harm 9, 85.8 %
    of MACs still INT8). Drop alone is blind to a unit that hurts only next to others; the larger of the two
    misses neither.
    """
    return max(recovery_alone, drop_alone)


def planned_passes(qmodel: nn.Module) -> int:
    """Forward passes over the data :func:`sensitivity` makes: two per unit, one float, one all-INT8."""
    return 2 * len(units(qmodel)) + 2


def unit_macs(qmodel: nn.Module, found: list[Unit], example: Any) -> tuple[dict[str, int], int]:
    """MACs per sample of each unit's module (graph units: 0), and of the whole model."""
    profile = profile_macs(qmodel, example)
    return {u.name: profile.modules.get(u.module, 0) if u.module else 0 for u in found}, profile.total


class Scorer:
    """Runs the model over the data with a set of units INT8 and scores it against the float outputs
    (collected once, on the first call of :meth:`float_reference`)."""

    def __init__(self, qmodel: nn.Module, data: Iterable[Any], metric: str, found: list[Unit], output: str | None,
                 reference_model: nn.Module | None = None) -> None:
        self.qmodel, self.data, self.metric, self.units, self.output = qmodel, data, metric, found, output
        self.reference_model = reference_model  # None: the model itself with every unit float
        self.passes = 0
        self.reference: metrics.Outputs | None = None

    def collect(self, int8: Iterable[Unit]) -> metrics.Outputs:
        with quantizing(self.qmodel, int8, self.units):
            out = metrics.collect(self.qmodel, self.data, name="the quantized model", output=self.output)
        self.passes += 1
        return out

    def float_reference(self) -> metrics.Outputs:
        """The float model's outputs.

        Raises:
            DataError: the metric needs labels and the data has none.
        """
        if self.reference is None:
            if self.reference_model is None:
                self.reference = self.collect(())
            else:
                self.reference = metrics.collect(self.reference_model, self.data, name="the float model",
                                                 output=self.output)
                self.passes += 1
            if self.metric in metrics.TASK and self.reference.labels is None:
                raise DataError(f"metric {self.metric} needs labels and the data has none; use metric: agreement")
        return self.reference

    def score(self, int8: Iterable[Unit]) -> tuple[float, float]:
        """``(metric, fidelity)`` with ``int8`` quantized and every other unit float."""
        result = metrics.score(self.metric, self.collect(int8), self.float_reference())
        return result[self.metric], result[FIDELITY]


def first_inputs(data: Iterable[Any], device: torch.device) -> Any:
    """The inputs of the first batch, on ``device``.

    Raises:
        DataError: the data is empty.
    """
    for batch in data:
        return move_inputs(split_batch(batch)[0], device)
    raise DataError("the data is empty")


def check_reiterable(data: Iterable[Any]) -> None:
    """Raises:
        CompressError: ``data`` is a one-shot iterator (it is read once per pass).
    """
    if iter(data) is data:
        raise CompressError("data is a one-shot iterator; pass a DataLoader or a list of batches (it is read once per pass)")


@torch.no_grad()
def sensitivity(
    qmodel: nn.Module,
    data: Iterable[Any],
    metric: str = "top1",
    *,
    output: str | None = None,
    announce: Callable[[str], None] | None = None,
    reference: nn.Module | None = None,
) -> Sensitivity:
    """Per-unit sensitivity of a calibrated quantized model (see the module docstring).

    The model runs where its parameters are; each quantizer's own setting is restored afterwards.

    Args:
        data: validation batches (a DataLoader or a list: it is read ``2 * units + 2`` times); never the split
            the model is finally reported on.
        metric: ``top1`` (or another task metric), a label-free one (``agreement``, ``cosine`` against the
            float model) or ``module:callable``.
        output: the model output the metric applies to (several outputs).
        announce: called with one line stating the cost (units, passes) before the first pass.
        reference: the float model to measure drops against (after QAT: the model before it); default the
            quantized model with every unit float.

    Returns:
        The float and all-INT8 scores and a row per unit, in module order (:meth:`Sensitivity.ranked` sorts).

    Raises:
        CompressError: not a quantized model, no enabled quantizers, a one-shot iterator for ``data``.
        DataError: empty data, or a task metric on data without labels.
    """
    found = quantized_units(qmodel, "sensitivity")
    check_reiterable(data)
    passes = 2 * len(found) + 2
    if announce is not None:
        announce(f"sensitivity: {len(found)} quantized units, {passes} forward passes over the data "
                 "(2 per unit, 1 float, 1 all-INT8)")
    return measure(Scorer(qmodel, data, metric, found, output, reference))


def quantized_units(qmodel: nn.Module, where: str) -> list[Unit]:
    """The model's enabled units.

    Raises:
        CompressError: not a quantized model, or every quantizer disabled.
    """
    if not is_quantized(qmodel):
        raise CompressError(f"{where}: the model has no quantizers; prepare and calibrate it first")
    found = units(qmodel)
    if not found:
        raise CompressError(f"{where}: every quantizer of the model is disabled (nothing is INT8)")
    return found


@torch.no_grad()
def measure(scorer: Scorer) -> Sensitivity:
    """:func:`sensitivity` with a :class:`Scorer` (whose float outputs a later search reuses)."""
    return measure_rows(scorer, ends(scorer))


@torch.no_grad()
def ends(scorer: Scorer) -> Sensitivity:
    """The table's two ends, every unit float and every unit INT8 (two passes), with each unit's name and MACs but
    no per-unit figure yet (:meth:`Sensitivity.measured` False)."""
    start = time.perf_counter()
    found, qmodel = scorer.units, scorer.qmodel
    device = next(qmodel.parameters(), torch.empty(0)).device
    example = first_inputs(scorer.data, device)
    with quantizing(qmodel, found, found):
        macs, total = unit_macs(qmodel, found, example)
    reference = scorer.float_reference()
    float_score = metrics.score(scorer.metric, reference, reference)[scorer.metric]
    int8_score, int8_fidelity = scorer.score(found)
    rows = [UnitSensitivity(u.name, u.kind.value, macs[u.name], None, None, None, None) for u in found]
    return Sensitivity(scorer.metric, float_score, int8_score, len(reference.logits), scorer.passes,
                       round(time.perf_counter() - start, 3), total, round(int8_fidelity, 6), rows)


@torch.no_grad()
def measure_rows(scorer: Scorer, table: Sensitivity) -> Sensitivity:
    """``table`` (from :func:`ends`, on the same scorer) with every unit's row measured: two passes per unit."""
    start = time.perf_counter()
    rows = []
    for unit, row in zip(scorer.units, table.rows, strict=True):
        alone, fid_alone = scorer.score([unit])
        without, fid_float = scorer.score([u for u in scorer.units if u is not unit])
        rows.append(replace(row, drop_alone=points(table.float_score - alone),
                            recovery_alone=points(without - table.int8_score), fidelity_alone=round(fid_alone, 6),
                            fidelity_float=round(fid_float, 6)))
    return replace(table, rows=rows, passes=table.passes + 2 * len(scorer.units),
                   seconds=round(table.seconds + time.perf_counter() - start, 3))
