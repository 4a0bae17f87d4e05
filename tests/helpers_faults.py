"""Planted faults: edit one layer's weights in an ONNX model or engine, FP32 or INT8, as a fault would.

INT8 faults go into what the engine really computes with: the int8 weight initializer of a
QLinearConv/QGemm (or a weight DequantizeLinear's input), its per-channel scale and its int32 bias.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from compress.export.qdq import Graph
from compress.sparsity.verify import _weight_source, layer_name

# op type -> (weight input, weight scale input or None, bias input)
_WEIGHTS = {"Conv": (1, None, 2), "FusedConv": (1, None, 2), "Gemm": (1, None, 2),
            "QLinearConv": (3, 4, 8), "QGemm": (3, 4, 6)}


class _Layer:
    def __init__(self, proto: onnx.ModelProto, layer: str) -> None:
        graph = Graph(proto)
        self.inits = {t.name: t for t in proto.graph.initializer}
        node = next((n for n in proto.graph.node if n.op_type in _WEIGHTS
                     and layer_name(n, _weight_source(graph, n.input[_WEIGHTS[n.op_type][0]])) == layer), None)
        if node is None:
            raise KeyError(f"no weighted node for layer {layer}")
        w, s, b = _WEIGHTS[node.op_type]
        dq = {o: n for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        weight = node.input[w]
        if weight in dq:  # a float op fed by DequantizeLinear(int8 weight, scale): fault the int8 weight and scale
            weight, scale = dq[weight].input[0], dq[weight].input[1]
        else:
            scale = node.input[s] if s is not None else None
        bias = node.input[b] if len(node.input) > b and node.input[b] else None
        bias = dq[bias].input[0] if bias in dq else bias
        self.weight = self.inits[weight]
        self.scale = self.inits[scale] if scale is not None else None
        self.bias = self.inits[bias] if bias is not None else None

    def get(self, t: onnx.TensorProto) -> np.ndarray:
        return numpy_helper.to_array(t).copy()

    def put(self, t: onnx.TensorProto, value: np.ndarray) -> None:
        t.CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(t).dtype), t.name))


def scale_weights(layer: _Layer, factor: float) -> None:
    """Weights x factor, bias unchanged (INT8: the weight scale x factor, the int32 bias / factor)."""
    if layer.scale is None:
        layer.put(layer.weight, layer.get(layer.weight) * factor)
        return
    layer.put(layer.scale, layer.get(layer.scale) * factor)
    if layer.bias is not None:
        layer.put(layer.bias, np.round(layer.get(layer.bias) / factor))


def zero_channel(layer: _Layer) -> None:
    """The output channel with the largest weights: weights and bias zeroed."""
    w = layer.get(layer.weight)
    c = int(np.abs(w.reshape(len(w), -1).astype(np.float64)).sum(1).argmax())
    w[c] = 0
    layer.put(layer.weight, w)
    if layer.bias is not None:
        b = layer.get(layer.bias)
        b[c] = 0
        layer.put(layer.bias, b)


def flip_bias(layer: _Layer) -> None:
    layer.put(layer.bias, -layer.get(layer.bias))


FAULTS: dict[str, Callable[[_Layer], None]] = {
    "x1.02": lambda layer: scale_weights(layer, 1.02),
    "x1.1": lambda layer: scale_weights(layer, 1.1),
    "x1.5": lambda layer: scale_weights(layer, 1.5),
    "zeroed channel": zero_channel,
    "flipped bias": flip_bias,
}


def plant(src: Path, dst: Path, layer: str, fault: str) -> Path:
    """Copy ONNX ``src`` to ``dst`` with ``fault`` (a key of FAULTS) planted in ``layer``."""
    proto = onnx.load(str(src))
    FAULTS[fault](_Layer(proto, layer))
    onnx.save(proto, str(dst))
    return dst
