"""Q/DQ graph surgery after ``torch.onnx.export``.

- :func:`fold_weight_quantizers`: ``float weight -> QuantizeLinear -> DequantizeLinear`` becomes an
  int8 initializer -> DequantizeLinear (what engines expect, and a 4x smaller file). The rounding
  matches torch's fake quantization (``round_half_even(x * (1 / scale))`` in float32).
- :func:`quantize_biases`: for ONNX Runtime, Conv/Gemm biases become int32 with scale
  ``input_scale * weight_scale`` behind a DequantizeLinear, which its QLinearConv/QGemm fusion needs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class Graph:
    """Lookups over an ONNX graph: producers, consumers, constant values."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        g = model.graph
        self.initializers = {t.name: t for t in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.graph_outputs = {o.name for o in g.output}

    def _resolve(self, name: str) -> str:
        node = self.producer.get(name)
        while node is not None and node.op_type == "Identity":  # the exporter dedups equal constants so
            name = node.input[0]
            node = self.producer.get(name)
        return name

    def const(self, name: str) -> np.ndarray | None:
        name = self._resolve(name)
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def const_dtype(self, name: str) -> int | None:
        name = self._resolve(name)
        if name in self.initializers:
            return self.initializers[name].data_type
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return next((a.t.data_type for a in node.attribute if a.name == "value"), None)
        return None


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def _quantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int) -> np.ndarray:
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    info = np.iinfo(zero.dtype)
    inv = (np.float32(1.0) / scale.astype(np.float32)).astype(np.float32)
    q = np.rint(x.astype(np.float32) * inv) + zero.astype(np.int64)
    return np.clip(q, info.min, info.max).astype(zero.dtype)


def fold_weight_quantizers(model: onnx.ModelProto) -> int:
    """Replace QuantizeLinear of constant weights by int8/uint8 initializers; returns how many."""
    graph = Graph(model)
    g = model.graph
    folded = 0
    drop: list[onnx.NodeProto] = []
    for node in g.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in graph.initializers:
            continue
        scale, zero = graph.const(node.input[1]), graph.const(node.input[2]) if len(node.input) > 2 else None
        if scale is None or zero is None or node.output[0] in graph.graph_outputs:
            continue
        weight = numpy_helper.to_array(graph.initializers[node.input[0]])
        q = _quantize(weight, scale, zero, _axis(node) % max(weight.ndim, 1))
        name = f"{node.input[0]}_quantized"
        g.initializer.append(numpy_helper.from_array(q, name))
        for user in graph.consumers.get(node.output[0], []):
            for k, inp in enumerate(user.input):
                if inp == node.output[0]:
                    user.input[k] = name
        drop.append(node)
        folded += 1
    for node in drop:
        g.node.remove(node)
    _remove_unused_initializers(model)
    return folded


def _remove_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def quantize_biases(model: onnx.ModelProto) -> int:
    """Int32 biases (scale = input scale x weight scale, zero point 0) for Conv/Gemm whose input and
    weight come from DequantizeLinear; returns how many were converted."""
    graph = Graph(model)
    g = model.graph
    done = 0
    new_nodes: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []
    for node in g.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in graph.initializers:
            continue
        dq_x, dq_w = graph.producer.get(node.input[0]), graph.producer.get(node.input[1])
        if not (dq_x and dq_w and dq_x.op_type == dq_w.op_type == "DequantizeLinear"):
            continue
        if node.op_type == "Gemm" and not any(a.name == "transB" and a.i == 1 for a in node.attribute):
            continue  # per-channel scales then run along axis 1 of the weight; leave the bias float
        s_x, s_w = graph.const(dq_x.input[1]), graph.const(dq_w.input[1])
        if s_x is None or s_w is None or s_x.size != 1:
            continue
        bias = numpy_helper.to_array(graph.initializers[node.input[2]]).astype(np.float64)
        scale = (s_x.astype(np.float64).reshape(()) * s_w.astype(np.float64)).astype(np.float32)
        scale = np.broadcast_to(scale, bias.shape).copy() if scale.size > 1 else scale.reshape(())
        ratio = np.rint(bias / scale.astype(np.float64))
        if np.any(np.abs(ratio) > 2**31 - 1):
            continue  # a tiny weight scale with a large bias: int32 would clip, so keep this bias float
        q = ratio.astype(np.int32)
        base = f"{node.output[0]}_bias_int32"  # per node: a module called twice has one bias, two scales
        g.initializer.extend([
            numpy_helper.from_array(q, base),
            numpy_helper.from_array(scale, f"{base}_scale"),
            numpy_helper.from_array(np.zeros_like(q) if scale.ndim else np.zeros((), np.int32), f"{base}_zero_point"),
        ])
        dq = helper.make_node(
            "DequantizeLinear", [base, f"{base}_scale", f"{base}_zero_point"], [f"{base}_dq"],
            name=f"{node.name or base}_bias_dq", **({"axis": 0} if scale.ndim else {}),
        )
        node.input[2] = f"{base}_dq"
        new_nodes.append((node, dq))
        done += 1
    for consumer, dq in new_nodes:
        g.node.insert(list(g.node).index(consumer), dq)
    _remove_unused_initializers(model)
    return done


def count_int8_weights(model: onnx.ModelProto) -> int:
    """DequantizeLinear nodes reading an 8-bit initializer (quantized weights)."""
    graph = Graph(model)
    return sum(
        1
        for n in model.graph.node
        if n.op_type == "DequantizeLinear"
        and graph.const_dtype(n.input[0]) in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
        and n.input[0] in graph.initializers
    )
