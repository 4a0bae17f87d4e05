"""TensorRT explicit-quantization rules, checked on an ONNX graph without TensorRT.

TensorRT builds a Q/DQ network into INT8 kernels only when the graph follows its rules
(TensorRT developer guide, "Explicit Quantization"): int8 symmetric Q/DQ (zero point 0), positive
scales, per-channel scales only on weights and only along the output-channel axis, every weighted
op (Conv, ConvTranspose, Gemm, MatMul) fed by DequantizeLinear on its data and weight inputs, and no
Q without a DQ after it (or DQ without a Q or constant before it).

Attention (an activation x activation MatMul: Q·Kᵀ, then softmax·V) is fused by TensorRT into its INT8
multi-head-attention kernels when DequantizeLinear feeds both MatMul inputs directly (no Transpose or
Reshape between; the scale is applied on the Q side before the Q/DQ) and the softmax output goes through
Q/DQ into the second MatMul. Such MatMuls are counted in ``attention_matmuls``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from compress.export.qdq import WEIGHTED_OPS, Graph

_INT8 = onnx.TensorProto.INT8


@dataclass
class RulesReport:
    """``checked_ops`` weighted ops run quantized; ``float_ops`` were left in float on purpose (no
    DequantizeLinear on any input, e.g. layers a recipe excluded)."""

    passed: bool
    checked_ops: int
    violations: list[str] = field(default_factory=list)
    float_ops: int = 0
    attention_matmuls: int = 0  # of checked_ops: activation x activation MatMuls (quantized attention)

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"passed": self.passed, "checked_ops": self.checked_ops, "float_ops": self.float_ops,
                                  "violations": self.violations}
        if self.attention_matmuls:
            out["attention_matmuls"] = self.attention_matmuls
        return out


_LAYOUT_OPS = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze")


def _source_dq(graph: Graph, name: str) -> tuple[onnx.NodeProto | None, bool, bool]:
    """The DequantizeLinear feeding ``name``, whether it feeds it without a layout op between, and
    whether a Cast stands between. Layout ops are looked through (a Linear on 3-D input exports as
    DQ(weight) -> Transpose -> MatMul), and so are Casts (a float16 graph below opset 19)."""
    node, direct, cast = graph.producer.get(name), True, False
    while node is not None and node.op_type in (*_LAYOUT_OPS, "Cast"):
        direct = direct and node.op_type == "Cast"
        cast = cast or node.op_type == "Cast"
        node = graph.producer.get(node.input[0])
    return (node, direct, cast) if node is not None and node.op_type == "DequantizeLinear" else (None, True, False)


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _weight_axis(node: onnx.NodeProto, index: int) -> int | None:
    """The output-channel axis of the weight at input ``index`` of ``node``."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1
    if node.op_type == "MatMul" and index == 1:
        return 1
    return None


def _is_activation(graph: Graph, dq: onnx.NodeProto) -> bool:
    """Whether a DequantizeLinear dequantizes a QuantizeLinear of a computed tensor (not of a weight)."""
    q = graph.producer.get(dq.input[0])
    return q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in graph.initializers \
        and graph.const(q.input[0]) is None


def _attention_problems(graph: Graph, node: onnx.NodeProto, found: list[tuple[onnx.NodeProto | None, bool, bool]],
                        label: str) -> list[str]:
    """An attention MatMul: both DQs feed it directly; a Softmax-fed input is quantized right after the Softmax."""
    problems = []
    for k, (_src, direct, _cast) in enumerate(found):
        if not direct:
            problems.append(f"{label}: attention MatMul input {k} reaches it through a Transpose/Reshape after its "
                            "DequantizeLinear; TensorRT's fused INT8 attention wants DQ to feed the MatMul directly")
    for src, _direct, _cast in found:
        q = graph.producer.get(src.input[0]) if src is not None else None
        before = graph.producer.get(q.input[0]) if q is not None else None
        if before is not None and before.op_type in _LAYOUT_OPS and graph.producer.get(before.input[0]) is not None \
                and graph.producer[before.input[0]].op_type == "Softmax":
            problems.append(f"{label}: a {before.op_type} stands between the Softmax and its QuantizeLinear")
    return problems


def check_tensorrt(model: onnx.ModelProto, max_listed: int = 20) -> RulesReport:
    """Check ``model`` against TensorRT's Q/DQ placement rules; ``violations`` name the nodes."""
    graph = Graph(model)
    problems: list[str] = []
    opset = {o.domain: o.version for o in model.opset_import}.get("", 0)
    if opset < 13:
        problems.append(f"opset {opset} < 13: per-channel DequantizeLinear needs opset 13")

    weight_dq: dict[str, int | None] = {}  # DQ output -> required axis
    checked = floats = attention = 0
    for node in model.graph.node:
        if node.op_type not in WEIGHTED_OPS:
            continue
        found = [_source_dq(graph, node.input[k]) for k in (0, 1)]
        sources = [src for src, _, _ in found]
        if not any(sources):
            floats += 1  # left in float on purpose: TensorRT runs it in float
            continue
        checked += 1
        label = f"{node.op_type} {node.name or node.output[0]}"
        if node.op_type == "MatMul" and all(src is not None and _is_activation(graph, src) for src in sources):
            attention += 1
            problems += _attention_problems(graph, node, found, label)
        for k, src in enumerate(sources):
            if src is None:
                what = "data" if k == 0 else "weight"
                problems.append(f"{label}: {what} input '{node.input[k]}' is not fed by DequantizeLinear")
                continue
            is_weight = graph.const(src.input[0]) is not None or (
                graph.producer.get(src.input[0]) is not None
                and graph.producer[src.input[0]].op_type == "QuantizeLinear"
                and graph.producer[src.input[0]].input[0] in graph.initializers
            )
            if found[k][2]:
                hint = ("export with opset >= 19 (float16 scales)" if opset < 19
                        else "keep the DequantizeLinear and the op in one precision")
                problems.append(f"{label}: a Cast stands between its input '{node.input[k]}' and the DequantizeLinear; "
                                f"TensorRT fuses Q/DQ into INT8 kernels when DQ feeds the op: {hint}")
            if is_weight:  # through a Transpose the output-channel axis moved: not checked then
                weight_dq[src.output[0]] = _weight_axis(node, k) if found[k][1] else None

    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        label = f"{node.op_type} {node.name or node.output[0]}"
        scale = graph.const(node.input[1])
        zero = graph.const(node.input[2]) if len(node.input) > 2 else None
        if scale is None:
            problems.append(f"{label}: scale is not a constant")
        elif not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            problems.append(f"{label}: scale must be finite and > 0")
        if len(node.input) < 3:
            problems.append(f"{label}: no zero point (defaults to uint8; TensorRT needs int8)")
        elif graph.const_dtype(node.input[2]) != _INT8:
            problems.append(f"{label}: zero point is not int8")
        elif zero is None or np.any(zero != 0):
            problems.append(f"{label}: zero point must be 0 (symmetric)")
        per_channel = scale is not None and scale.ndim == 1 and scale.size > 1
        if node.op_type == "QuantizeLinear":
            users = graph.consumers.get(node.output[0], [])
            if not users or any(u.op_type != "DequantizeLinear" for u in users) or node.output[0] in graph.graph_outputs:
                problems.append(f"{label}: output does not go (only) to DequantizeLinear")
            if per_channel and node.input[0] not in graph.initializers:
                problems.append(f"{label}: per-channel scales on an activation")
        else:
            src = graph.producer.get(node.input[0])
            if graph.const(node.input[0]) is None and (src is None or src.op_type != "QuantizeLinear"):
                problems.append(f"{label}: input is neither a constant nor a QuantizeLinear output")
            if graph.const_dtype(node.input[0]) not in (None, _INT8):
                problems.append(f"{label}: quantized weights are not int8")
            if not graph.consumers.get(node.output[0]) and node.output[0] not in graph.graph_outputs:
                problems.append(f"{label}: output is unused")
            if per_channel:
                if node.output[0] not in weight_dq:
                    problems.append(f"{label}: per-channel scales on something other than a weight")
                elif weight_dq[node.output[0]] is not None and _attr(node, "axis", 1) != weight_dq[node.output[0]]:
                    problems.append(
                        f"{label}: per-channel axis {_attr(node, 'axis', 1)}, the weight's output channels are on "
                        f"axis {weight_dq[node.output[0]]}"
                    )
    listed = problems[:max_listed] + ([f"... {len(problems) - max_listed} more"] if len(problems) > max_listed else [])
    return RulesReport(not problems, checked, listed, floats, attention)
