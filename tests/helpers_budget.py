"""A trained digits CNN with one layer made deliberately sensitive to INT8, for the accuracy-budget tests.

The float model is unchanged in what it computes: channel 0 of ``layer1.bn1`` is scaled by ``OUTLIER``
(ReLU commutes with a positive scale) and ``layer1.conv2``'s weights reading that channel by its inverse.
The per-tensor input quantizer of ``layer1.conv2`` then calibrates to the outlier channel's range and
rounds the other 31 channels to almost nothing: about 85 points of top-1 lost on digits, while every
other layer alone costs a sample or two. Per-channel weight scales absorb the 1/OUTLIER weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from helpers_quant import digits
from torch import nn

import compress
from compress import quant

SENSITIVE = "layer1.conv2"
OUTLIER = 1000.0


@torch.no_grad()
def outlier_model(checkpoint: Path, outlier: float = OUTLIER) -> nn.Module:
    """The float digits CNN of ``checkpoint`` with the outlier channel planted in front of ``SENSITIVE``."""
    model = compress.load(checkpoint)
    model.layer1.bn1.weight[0] *= outlier
    model.layer1.bn1.bias[0] *= outlier
    model.layer1.conv2.weight[:, 0] /= outlier
    return model


def outlier_checkpoint(checkpoint: Path, path: Path) -> Path:
    compress.save(outlier_model(checkpoint), path)
    return path


def sensitive_model(checkpoint: Path, target: str = "tensorrt", outlier: float = OUTLIER) -> nn.Module:
    """:func:`outlier_model` prepared for ``target`` and max-calibrated on 512 train digits."""
    qmodel = quant.prepare(outlier_model(checkpoint, outlier), target)
    compress.ptq.calibrate(qmodel, digits("train"), "max", limit=512)
    return qmodel
