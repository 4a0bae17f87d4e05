"""An un-fused view of an ONNX Runtime engine: fused and integer ops written back as plain ONNX ops.

ONNX Runtime's optimiser (the engine files ``build_engine`` saves) merges a Conv with its activation
(``FusedConv``, ``FusedGemm``) and runs a Q/DQ group as one integer op (``QLinearConv``, ``QGemm``,
``QLinearMatMul``). Those ops keep the layer's weights but hide its own output: a ``FusedConv``
yields the activation's output, a ``QLinearConv`` a requantized tensor. For per-layer taps each is
rewritten as the ops it stands for, with the layer's float output as a tensor of its own:

- ``FusedConv(X, W, B[, Z])`` -> ``Conv`` -> [``Add Z``] -> activation
- ``QLinearConv`` / ``QGemm`` / ``QLinearMatMul`` -> ``DequantizeLinear`` of input, weight and bias ->
  ``Conv``/``Gemm``/``MatMul`` -> ``QuantizeLinear`` (when the op requantized its output)

The view computes what the engine computes from the same weights and scales (in float rather than
in integers, so a value may land one quantization step apart where a rounding tie falls differently);
it is for localisation taps only, never for timing or for the check's own verdict.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import onnx
from onnx import helper

#: What ``unfuse`` rewrote, by op type; ops it leaves fused are counted in :func:`untapped_ops`.
UNFUSED = ("FusedConv", "FusedGemm", "QLinearConv", "QGemm", "QLinearMatMul")
#: Weighted ops whose output is a layer's float output as it stands (tapped without a rewrite).
TAPPABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul", "FusedMatMul", "MatMulIntegerToFloat")
#: Weighted ops no rewrite here covers (dynamic quantization's integer outputs, NCHWc layouts).
UNTAPPED = ("ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul", "NchwcConv")


@dataclass
class _Rewriter:
    graph: onnx.GraphProto
    count: int = 0

    def name(self, base: str, what: str) -> str:
        self.count += 1
        return f"{base}__unfused_{what}_{self.count}"

    def node(self, op: str, inputs: list[str], output: str, name: str, **attrs: Any) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [output], name=name, **attrs)

    def dequantize(self, out: list[onnx.NodeProto], base: str, x: str, scale: str, zero: str | None,
                   axis: int | None = None) -> str:
        y = self.name(base, "dq")
        inputs = [x, scale] + ([zero] if zero else [])
        out.append(self.node("DequantizeLinear", inputs, y, y, **({"axis": axis} if axis is not None else {})))
        return y

    def bias_scale(self, out: list[onnx.NodeProto], base: str, x_scale: str, w_scale: str) -> str:
        y = self.name(base, "bias_scale")
        out.append(self.node("Mul", [x_scale, w_scale], y, y))
        return y


def _attrs(node: onnx.NodeProto, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name not in drop}


def _per_channel(graph: onnx.GraphProto, scale: str) -> bool:
    init = next((t for t in graph.initializer if t.name == scale), None)
    return init is not None and len(init.dims) == 1 and init.dims[0] > 1


def _activation_of(node: onnx.NodeProto) -> tuple[str, list[float]]:
    """The activation a FusedConv (``activation_params``) or FusedGemm (``activation_alpha/beta``) applies."""
    attrs = _attrs(node)
    kind = attrs.get("activation", b"")
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    if "activation_params" in attrs:
        return kind, [float(v) for v in attrs["activation_params"]]
    return kind, [float(attrs[k]) for k in ("activation_alpha", "activation_beta") if k in attrs]


def _activation(r: _Rewriter, out: list[onnx.NodeProto], node: onnx.NodeProto, x: str, y: str) -> None:
    kind, params = _activation_of(node)
    base = node.name
    if not kind:
        out.append(r.node("Identity", [x], y, r.name(base, "identity")))
    elif kind in ("Relu", "Sigmoid", "Tanh"):
        out.append(r.node(kind, [x], y, r.name(base, kind.lower())))
    elif kind == "LeakyRelu":
        out.append(r.node(kind, [x], y, r.name(base, "leakyrelu"), alpha=params[0] if params else 0.01))
    elif kind == "HardSigmoid" and len(params) == 2:
        out.append(r.node(kind, [x], y, r.name(base, "hardsigmoid"), alpha=params[0], beta=params[1]))
    elif kind == "Clip" and len(params) == 2:
        lo, hi = r.name(base, "clip_min"), r.name(base, "clip_max")
        out.append(helper.make_node("Constant", [], [lo], name=lo, value_float=params[0]))
        out.append(helper.make_node("Constant", [], [hi], name=hi, value_float=params[1]))
        out.append(r.node("Clip", [x, lo, hi], y, r.name(base, "clip")))
    else:
        raise ValueError(f"{base}: {node.op_type} with activation {kind} {params} has no un-fused form here")


_ACTIVATION_ATTRS = ("activation", "activation_params", "activation_alpha", "activation_beta", "activation_gamma")


def _fused_conv(r: _Rewriter, node: onnx.NodeProto) -> tuple[list[onnx.NodeProto], str]:
    out: list[onnx.NodeProto] = []
    conv = r.name(node.name, "conv")
    weighted = "Conv" if node.op_type == "FusedConv" else "Gemm"
    out.append(r.node(weighted, list(node.input[:3]), conv, node.name, **_attrs(node, _ACTIVATION_ATTRS)))
    x = conv
    if weighted == "Conv" and len(node.input) > 3 and node.input[3]:  # FusedConv's Z: a residual added before the activation
        x = r.name(node.name, "sum")
        out.append(r.node("Add", [conv, node.input[3]], x, x))
    _activation(r, out, node, x, node.output[0])
    return out, conv


def _qlinear(r: _Rewriter, node: onnx.NodeProto) -> tuple[list[onnx.NodeProto], str]:
    """QLinearConv (x, xs, xz, w, ws, wz, ys, yz[, B]), QLinearMatMul (a, as, az, b, bs, bz, ys, yz),
    QGemm (a, as, az, b, bs, bz[, C, ys, yz])."""
    i = list(node.input) + [""] * 3
    out: list[onnx.NodeProto] = []
    x = r.dequantize(out, node.name, i[0], i[1], i[2] or None)
    axis = 0 if node.op_type == "QLinearConv" or _attrs(node).get("transB", 0) else 1
    w = r.dequantize(out, node.name, i[3], i[4], i[5] or None, axis if _per_channel(r.graph, i[4]) else None)
    if node.op_type == "QGemm":
        bias, y_scale, y_zero = i[6], i[7], i[8]
    elif node.op_type == "QLinearConv":
        bias, y_scale, y_zero = i[8], i[6], i[7]
    else:
        bias, y_scale, y_zero = "", i[6], i[7]
    inputs = [x, w]
    if bias:
        scale = r.bias_scale(out, node.name, i[1], i[4])
        inputs.append(r.dequantize(out, node.name, bias, scale, None, 0 if _per_channel(r.graph, i[4]) else None))
    weighted = {"QLinearConv": "Conv", "QGemm": "Gemm", "QLinearMatMul": "MatMul"}[node.op_type]
    y = node.output[0] if not y_scale else r.name(node.name, weighted.lower())
    out.append(r.node(weighted, inputs, y, node.name, **_attrs(node)))
    if y_scale:
        out.append(r.node("QuantizeLinear", [y, y_scale] + ([y_zero] if y_zero else []), node.output[0],
                          r.name(node.name, "q")))
    return out, y


_REWRITES: dict[str, Callable[[_Rewriter, onnx.NodeProto], tuple[list[onnx.NodeProto], str]]] = {
    "FusedConv": _fused_conv, "FusedGemm": _fused_conv,
    "QLinearConv": _qlinear, "QGemm": _qlinear, "QLinearMatMul": _qlinear,
}


def unfuse(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``model`` with every op in :data:`UNFUSED` written back as plain ONNX ops.

    Returns:
        The new model and, per rewritten op's node name, the tensor holding its layer's float output
        (the Conv/Gemm/MatMul output before any activation or requantization).

    Raises:
        ValueError: a fused activation this rewrite does not know.
    """
    new = onnx.ModelProto()
    new.CopyFrom(model)
    rewriter = _Rewriter(new.graph)
    nodes: list[onnx.NodeProto] = []
    layer_out: dict[str, str] = {}
    for node in new.graph.node:
        rewrite = _REWRITES.get(node.op_type)
        if rewrite is None:
            nodes.append(node)
            continue
        replaced, tapped = rewrite(rewriter, node)
        nodes.extend(replaced)
        layer_out[node.name] = tapped
    del new.graph.node[:]
    new.graph.node.extend(nodes)
    return new, layer_out


def untapped_ops(model: onnx.ModelProto) -> list[str]:
    """Node names of weighted ops whose layer output no tap can read (see :data:`UNTAPPED`)."""
    return [f"{n.name or n.output[0]} ({n.op_type})" for n in model.graph.node if n.op_type in UNTAPPED]
