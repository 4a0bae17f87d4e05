"""``qat``: quantize (calibrating first unless a ptq stage already did) and fine-tune with fake quantization."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field
from torch import nn

from compress import quant
from compress.errors import CompressError
from compress.export.latency import float_copy
from compress.qat.callback import QatCallback
from compress.stages.budget import Budget, apply_budget, check_budget
from compress.stages.context import StageContext, StageResult
from compress.stages.finetune import StageFinetune, stage_finetune
from compress.stages.order import quantized_before
from compress.stages.quantize import (
    QuantOptions,
    calibration_warnings,
    check_quant_options,
    quantize,
    refuse_ignored,
    resolve_target,
)
from compress.stages.registry import Effect, register


class QatConfig(QuantOptions):
    finetune: StageFinetune = Field(default_factory=lambda: StageFinetune(epochs=1, lr=1e-3))
    freeze_bn_after: Annotated[int, Field(ge=0)] | None = None  # epoch from which BatchNorm statistics stop
    # after the fine-tune: keep the units float that INT8 still costs most, as ptq.budget does; the drop is
    # measured against the float model the stage started from (its fine-tuned weights co-adapted with their
    # quantizers: in float they may score far below it)
    budget: Budget | None = None


_CALIBRATION_OPTIONS = ("include", "exclude", "attention", "calibrator", "percentile", "limit")
_CALIBRATED = "the model is already quantized and calibrated (by an earlier stage or its checkpoint)"


def _check(model: nn.Module, config: QatConfig, ctx: StageContext) -> str | None:
    check_quant_options(model, config, ctx)
    if quantized_before(model, ctx):
        refuse_ignored(config, ctx, _CALIBRATION_OPTIONS, _CALIBRATED)
    ctx.splits.loader("train", needed_by=ctx.where)
    return check_budget(model, config.budget, ctx) if config.budget is not None else None


@register("qat", QatConfig, check=_check, effects=Effect.QUANTIZES)
def run_qat(model: nn.Module, config: QatConfig, ctx: StageContext) -> StageResult:
    info: dict = {}
    before = float_copy(model).eval() if config.budget is not None else None  # the float model, for the budget
    if quant.is_quantized(model) and not quant.uncalibrated(model):
        qmodel = model  # after ptq: start from its calibrated ranges
        refuse_ignored(config, ctx, _CALIBRATION_OPTIONS, _CALIBRATED)
        own, wanted = quant.target_of(model), resolve_target(config, ctx)
        if config.target is not None and own is not wanted:
            raise CompressError(f"{ctx.where}.target: is {wanted.value} but the model was quantized for {own.value}")  # type: ignore[union-attr]
        info["target"] = own.value  # type: ignore[union-attr]
    else:
        qmodel, info = quantize(model, config, ctx)
    info["finetune"] = stage_finetune(qmodel, config.finetune, ctx, [QatCallback(config.freeze_bn_after)])
    warnings = calibration_warnings(info)
    if config.budget is not None:
        warnings += apply_budget(before, qmodel, config.budget, ctx, info, info["target"], reference=before)
    return StageResult(qmodel, info=info, warnings=warnings)
