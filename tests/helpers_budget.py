"""A calibrated INT8 digits CNN with one layer made deliberately sensitive, for the accuracy-budget tests."""

from __future__ import annotations

from pathlib import Path

from helpers_quant import digits
from torch import nn

import compress
from compress import quant

SENSITIVE = "layer1.conv2"
# Its input quantizer's range blown up 300x: the calibrated range then spans under 1 of the 127 levels, so
# the layer sees its input rounded almost to zero (about 85 points of top-1 lost on digits; every
# other layer alone costs at most a sample or two).
FACTOR = 300.0


def sensitive_model(checkpoint: Path, target: str = "tensorrt", factor: float = FACTOR) -> nn.Module:
    """The trained digits CNN, prepared for ``target``, max-calibrated on 512 train digits, with ``SENSITIVE``'s
    input range multiplied by ``factor`` (its ``input_quantizer``; for ``onnxruntime`` the graph quantizer of the
    tensor only it reads)."""
    qmodel = quant.prepare(compress.load(checkpoint), target)
    compress.ptq.calibrate(qmodel, digits("train"), "max", limit=512)
    (unit,) = [u for u in quant.units(qmodel) if u.name == SENSITIVE]
    (name,) = [n for n in unit.quantizers if not n.endswith("weight_quantizer")]
    qmodel.get_submodule(name).amax *= factor
    return qmodel
