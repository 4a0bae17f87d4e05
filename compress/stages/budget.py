"""The accuracy budget a quantizing stage can carry (``ptq`` and ``qat``): keep the most sensitive units float
until the metric on ``data.val`` is within ``max_drop`` points of the float model's
(:func:`compress.ptq.fallback`); never measured on ``data.eval``. ``engine: true`` confirms the steps that meet it
on an ONNX Runtime engine (exported as the export stage would, run at optimization level ``all``) and times every
step's engine against the float model's (:mod:`compress.ptq.step_latency`): the latency each step buys back.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from torch import nn

from compress import io, metrics
from compress.checkpoint import weights_digest
from compress.config import Strict
from compress.data import split_batch
from compress.errors import CompressError
from compress.export.onnx import export_onnx
from compress.export.onnxruntime import OrtEngine
from compress.ptq.confirm import SHARE, SplitTooSmall, split
from compress.ptq.fallback import Fallback, fallback
from compress.ptq.step_latency import BATCH_SIZE, step_latency
from compress.quant import quantizable_layers
from compress.quant import units as quant_units
from compress.stages.context import StageContext
from compress.train import is_main_process


class Budget(Strict):
    """``ptq.budget``: how much of the metric INT8 may cost, measured on ``data.val``."""

    # points of the metric (0.3 = 0.3 percentage points); a metric is a fraction, so 100 is its whole range
    max_drop: Annotated[float, Field(ge=0, le=100)]
    metric: str | None = None  # default: the recipe's metric
    max_units: Annotated[int, Field(gt=0)] | None = None  # at most this many units in float (default: no limit)
    # confirm on an ONNX Runtime engine (over the confirm part) the steps the fake-quant model says meet the budget,
    # and time every step's engine against the float model's (batch 8)
    engine: bool = False
    # share of data.val held out (interleaved by position) to confirm each step; the search never sees it.
    # 0: none (the budget is then checked on the very samples that chose the units: optimistic on unseen data)
    confirm: Annotated[float, Field(ge=0, lt=1)] = SHARE

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str | None) -> str | None:
        return None if v is None else metrics.check_metric_name(v)


def check_budget(model: nn.Module, budget: Budget, ctx: StageContext) -> str:
    """Dry-run checks of ``budget``: ``data.val`` present, labels there for a task metric. Returns the cost line.

    Raises:
        CompressError: no ``data.val``; a task metric on a val split without labels.
    """
    where = f"{ctx.where}.budget"
    if not ctx.splits.has("val"):
        raise CompressError(f"{where}: needs data.val (a split, or {{holdout: F}} of data.train) to measure on; "
                            "a budget is never measured on data.eval")
    metric = budget.metric or ctx.metric
    loader = ctx.splits.loader("val", needed_by=where)
    _held_out(loader, budget.confirm, where)
    if metric in metrics.TASK:
        _, labels = split_batch(next(iter(loader)))
        if labels is None:
            field = "metric" if budget.metric else "metric (the recipe's)"
            raise CompressError(f"{where}.{field}: {metric} needs labels but data.val has none; "
                                "use metric: agreement (label-free, against the float model)")
    held = f"{budget.confirm:g} of data.val held out to confirm" if budget.confirm else "no confirm part"
    return f"budget ({held}): all-INT8 first (4 passes); if it misses, 2 passes over the search part per " \
           f"quantized unit, then 2 per unit put in float (~{len(quantizable_layers(model))} quantizable layers)"


def _held_out(loader: Any, share: float, where: str) -> None:
    """Raises:
        CompressError: data.val too small to hold ``share`` out, naming ``budget.confirm``.
    """
    try:
        split(loader, share)
    except SplitTooSmall as exc:
        raise CompressError(f"{where}.confirm: data.val has {exc.samples} sample(s), too few to hold {share} of "
                            f"them out to confirm the budget on (at least {exc.needed} needed); give data.val more "
                            "samples, or set confirm: 0 to check it on the samples the search chose on") from None


class SavedSearch:
    """The search so far in ``stage_dir/budget.json``, written after every step (by rank 0), so a run interrupted
    mid-search and resumed (``compress run --resume``) measures only what it had not. Read back only for the same
    calibrated model (the digest of its state_dict, amax included) on the same data (the recipe's ``data``
    section and seed) and metric output."""

    def __init__(self, path: Path, qmodel: nn.Module, ctx: StageContext) -> None:
        digest = hashlib.sha256(weights_digest(qmodel.state_dict()).encode())
        digest.update(json.dumps([ctx.recipe.resolved().get("data"), ctx.recipe.body.seed, ctx.metric_output],
                                 sort_keys=True, default=str).encode())
        self.path, self.digest = path, digest.hexdigest()

    def write(self, search: Fallback) -> None:
        if is_main_process():
            io.write_json(self.path, {"fingerprint": self.digest, "search": search.to_dict()})

    def read(self) -> Fallback | None:
        try:
            saved = json.loads(self.path.read_text())
            return Fallback.from_dict(saved["search"]) if saved.get("fingerprint") == self.digest else None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # none yet, or not ours: measure again
            return None


def _engine_builder(ctx: StageContext, folder: Path) -> Callable[[nn.Module], Any]:
    """``model -> OrtEngine``: the model exported to ONNX (its own target, dynamic batch) and loaded in ONNX Runtime."""
    count = itertools.count()

    def build(model: nn.Module) -> OrtEngine:
        path = folder / f"step{next(count)}.onnx"
        try:
            export_onnx(model, ctx.example_input, path)
        except CompressError as exc:
            raise CompressError(f"{ctx.where}.budget.engine: {exc}") from None
        return OrtEngine(path)

    return build


def apply_budget(float_model: nn.Module, qmodel: nn.Module, budget: Budget, ctx: StageContext,
                 info: dict[str, Any], target: str, reference: nn.Module | None = None) -> list[str]:
    """Keep the most sensitive units of ``qmodel`` float until ``budget`` holds on data.val (in place); the search
    goes into ``info["budget"]``. ``float_model``: what each step's engine is timed against; ``reference``: the
    model the drop is measured against (default ``qmodel`` with every unit float). Returns warnings."""
    check_budget(float_model, budget, ctx)
    warnings: list[str] = []

    def announce(line: str) -> None:
        if ctx.progress:
            print(f"{ctx.where}: {line}", file=sys.stderr, flush=True)

    saved = SavedSearch(ctx.stage_dir / "budget.json", qmodel, ctx)
    every_unit = quant_units(qmodel)  # before the search puts any float
    with tempfile.TemporaryDirectory(prefix="compress-budget-") as tmp:
        result = fallback(qmodel, ctx.splits.loader("val", needed_by=f"{ctx.where}.budget"), budget.max_drop,
                          budget.metric or ctx.metric, output=ctx.metric_output, max_units=budget.max_units,
                          confirm=budget.confirm, announce=announce,
                          engine=_engine_builder(ctx, Path(tmp)) if budget.engine else None,
                          on_step=saved.write, resume=saved.read(), reference=reference)
        info["budget"] = {**result.to_dict(), "split": "val"}
        if budget.engine:  # the price of each step: engine latency against the float model
            announce(f"timing {len(result.steps)} step engine(s) against the float model, batch {BATCH_SIZE}")
            info["budget"]["latency"] = step_latency(float_model, qmodel, every_unit, result.steps, ctx.example_input,
                                                     Path(tmp))
    announce(result.summary())
    if not result.met:
        warnings.append(f"{ctx.where}.budget: {result.summary()}")
    if budget.engine and target == "tensorrt":
        warnings.append(f"{ctx.where}.budget.engine: measured in ONNX Runtime, which runs a tensorrt-target graph "
                        "with INT8 simulated in float; a TensorRT engine may round differently")
    return warnings
