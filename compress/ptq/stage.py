"""``ptq``: insert quantizers for the export target and calibrate them on the calibration split."""

from __future__ import annotations

from torch import nn

from compress.stages.context import StageContext, StageResult
from compress.stages.quantize import QuantOptions, calibration_warnings, check_quant_options, quantize
from compress.stages.registry import Effect, register


class PtqConfig(QuantOptions):
    pass


@register("ptq", PtqConfig, check=check_quant_options, effects=Effect.QUANTIZES)
def run_ptq(model: nn.Module, config: PtqConfig, ctx: StageContext) -> StageResult:
    qmodel, info = quantize(model, config, ctx)
    return StageResult(qmodel, info=info, warnings=calibration_warnings(info))
