"""Quantized layers: subclasses of the float layers with an input and a per-channel weight quantizer.

They keep the float layer's parameters (state_dicts load, ``isinstance(m, nn.Conv2d)`` holds) and
add ``input_quantizer`` / ``weight_quantizer`` submodules. ``input_quantizer`` is an
``nn.Identity`` when the target quantizes the input elsewhere (once per tensor, see
:mod:`compress.quant.graph`).

A weight quantizer's range is always max |w| per output channel of the weight as it is now (calibration
sets exactly that): :meth:`QuantLayer.quantized_weight` recomputes it whenever the weight changed since
the range was set (an optimizer step, ``load_state_dict``, a deep copy). QAT in a user's own loop, with
any optimizer, therefore needs no callback and no per-step call. Why automatic rather than a documented
``compress.qat.step(model)`` after each step: the range is a pure function of the weights, so computing
it where it is used cannot disagree with any loop (gradient accumulation, DDP, a step skipped by AMP's
scaler), while a per-step call is one more line every loop must get right and silently drifts when
forgotten. The check costs one version-counter compare per layer and forward; the recompute (one
``amax`` over the weight, no host sync) runs once per step.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from compress.eager import changed_since, outside_trace, stamp
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

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight, its range first brought up to date if the weight changed (see the module doc)."""
        if changed_since(self.weight, self.__dict__.get(_RANGE_OF)):
            follow_weight(self)
        return self.weight_quantizer(self.weight)


_RANGE_OF = "_compress_weight_range_of"  # the (id, version) stamp of the weight the range was computed from


def range_is_current(layer: QuantLayer) -> None:
    """Record that ``layer``'s weight range was just set from its weight as it is now."""
    layer.__dict__[_RANGE_OF] = stamp(layer.weight)


def follow_weight(layer: QuantLayer) -> None:
    """Set the weight quantizer's per-channel range to max |w| (an all-zero channel gets 1, as ``set_amax``
    gives it), without a host sync; outside any ONNX trace."""
    q = layer.weight_quantizer
    with outside_trace():
        w = layer.weight.detach()
        amax = w.abs().amax(dim=[d for d in range(w.ndim) if d != q.spec.axis]).float()
        q.amax.copy_(torch.where(amax > 0, amax, torch.ones_like(amax)).reshape(q.amax.shape))
    range_is_current(layer)


class QuantConv1d(nn.Conv1d, QuantLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.quantized_weight(), self.bias)


class QuantConv2d(nn.Conv2d, QuantLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.quantized_weight(), self.bias)


class QuantConv3d(nn.Conv3d, QuantLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.quantized_weight(), self.bias)


class QuantConvTranspose2d(nn.ConvTranspose2d, QuantLayer):
    weight_axis = 1  # weight is (in, out/groups, kh, kw)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        output_padding = self._output_padding(
            x, output_size, list(self.stride), list(self.padding), list(self.kernel_size), 2, list(self.dilation)
        )
        return F.conv_transpose2d(
            self.input_quantizer(x), self.quantized_weight(), self.bias, self.stride, self.padding,
            output_padding, self.groups, self.dilation,
        )


class QuantLinear(nn.Linear, QuantLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias)


BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# Exact float types only: a user's subclass of nn.Conv2d may change forward in ways we would lose.
QUANT_LAYERS: dict[type[nn.Module], type[QuantLayer]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.Linear: QuantLinear,
}
