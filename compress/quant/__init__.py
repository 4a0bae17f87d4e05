"""Fake quantization shared by PTQ and QAT: spec -> quantizer -> quantized layers -> insertion.

    qmodel = compress.quant.prepare(model, target="tensorrt")   # insert quantizers (no global patching)
    compress.ptq.calibrate(qmodel, calib_loader, method="entropy")
    compress.export.onnx(qmodel, x[:1], "ort.onnx", target="onnxruntime")   # or either target at export time
"""

from compress.quant.attention import QuantMultiheadAttention
from compress.quant.fold import fold_batchnorm
from compress.quant.insert import (
    Attention,
    QuantConfig,
    attention_mode,
    is_quantized,
    plan_of,
    prepare,
    quant_layers,
    quantizable_layers,
    quantizers,
    refresh_weight_amax,
    select_layers,
    target_of,
    to_target,
    uncalibrated,
)
from compress.quant.keep_float import float_units, keep_float
from compress.quant.layers import QuantConv1d, QuantConv2d, QuantConv3d, QuantConvTranspose2d, QuantLayer, QuantLinear
from compress.quant.quantizer import TensorQuantizer
from compress.quant.retarget import retarget
from compress.quant.sdpa import AttentionQuantizers
from compress.quant.spec import QuantSpec, Target
from compress.quant.units import Unit, UnitKind, quantizing, units

__all__ = [
    "Attention",
    "AttentionQuantizers",
    "QuantConfig",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantConvTranspose2d",
    "QuantLayer",
    "QuantLinear",
    "QuantMultiheadAttention",
    "QuantSpec",
    "Target",
    "TensorQuantizer",
    "Unit",
    "UnitKind",
    "attention_mode",
    "float_units",
    "fold_batchnorm",
    "is_quantized",
    "keep_float",
    "plan_of",
    "prepare",
    "quant_layers",
    "quantizable_layers",
    "quantizers",
    "quantizing",
    "refresh_weight_amax",
    "retarget",
    "select_layers",
    "target_of",
    "to_target",
    "uncalibrated",
    "units",
]
