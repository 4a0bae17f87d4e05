"""Quantized layers: subclasses of the float layers with an input and a per-channel weight quantizer.

They keep the float layer's parameters (state_dicts load, ``isinstance(m, nn.Conv2d)`` holds) and
add ``input_quantizer`` / ``weight_quantizer`` submodules. ``input_quantizer`` is an
``nn.Identity`` when the target quantizes the input elsewhere (once per tensor, see
:mod:`compress.quant.graph`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from compress.quant.quantizer import TensorQuantizer
from compress.quant.spec import QuantSpec


class QuantLayer:
    """Mixin: the two quantizers and the conversion from a float layer."""

    input_quantizer: nn.Module
    weight_quantizer: TensorQuantizer
    weight: nn.Parameter
    weight_axis = 0  # the output-channel axis of the weight

    @classmethod
    def from_float(cls, layer: nn.Module, input_spec: QuantSpec | None, name: str) -> QuantLayer:
        """Turn ``layer`` into this class in a new object sharing its parameters and hooks."""
        new = cls.__new__(cls)
        new.__dict__.update(layer.__dict__)
        new._modules = OrderedDict(layer._modules)
        new.input_quantizer = (
            TensorQuantizer(input_spec, name=f"{name}.input_quantizer") if input_spec is not None else nn.Identity()
        )
        axis = cls.weight_axis
        new.weight_quantizer = TensorQuantizer(
            QuantSpec(axis=axis), channels=layer.weight.shape[axis], name=f"{name}.weight_quantizer"
        )
        return new


class QuantConv1d(nn.Conv1d, QuantLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantConv2d(nn.Conv2d, QuantLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantConv3d(nn.Conv3d, QuantLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantConvTranspose2d(nn.ConvTranspose2d, QuantLayer):
    weight_axis = 1  # weight is (in, out/groups, kh, kw)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        output_padding = self._output_padding(
            x, output_size, list(self.stride), list(self.padding), list(self.kernel_size), 2, list(self.dilation)
        )
        return F.conv_transpose2d(
            self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias, self.stride, self.padding,
            output_padding, self.groups, self.dilation,
        )


class QuantLinear(nn.Linear, QuantLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# Exact float types only: a user's subclass of nn.Conv2d may change forward in ways we would lose.
QUANT_LAYERS: dict[type[nn.Module], type[QuantLayer]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.Linear: QuantLinear,
}
