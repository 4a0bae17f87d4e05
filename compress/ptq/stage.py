"""``ptq``: insert quantizers for the export target and calibrate them on the calibration split.

With ``budget: {max_drop, metric}`` the most sensitive units are then kept float until the metric on
``data.val`` is within ``max_drop`` points of the float model's (:mod:`compress.stages.budget`).
"""

from __future__ import annotations

from torch import nn

from compress.stages.budget import Budget, apply_budget, check_budget
from compress.stages.context import StageContext, StageResult
from compress.stages.quantize import QuantOptions, calibration_warnings, check_quant_options, quantize
from compress.stages.registry import Effect, register


class PtqConfig(QuantOptions):
    budget: Budget | None = None


def check_ptq(model: nn.Module, config: PtqConfig, ctx: StageContext) -> str | None:
    check_quant_options(model, config, ctx)
    return check_budget(model, config.budget, ctx) if config.budget is not None else None


@register("ptq", PtqConfig, check=check_ptq, effects=Effect.QUANTIZES)
def run_ptq(model: nn.Module, config: PtqConfig, ctx: StageContext) -> StageResult:
    qmodel, info = quantize(model, config, ctx)
    warnings = calibration_warnings(info)
    if config.budget is not None:
        warnings += apply_budget(model, qmodel, config.budget, ctx, info, info["target"])
    return StageResult(qmodel, info=info, warnings=warnings)
