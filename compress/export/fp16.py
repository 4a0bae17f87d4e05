"""FP32 -> FP16 for the non-quantized parts of an ONNX graph, with the casts written into the file.

Strongly typed TensorRT (required from TensorRT 11, opt-in in 10) runs every tensor in the type the
ONNX file gives it: builder flags no longer pick FP16. So ``engine: {precision: fp16}`` converts the
graph itself, like ModelOpt's AutoCast:

- every float initializer, Constant and op output becomes float16; the graph's inputs and outputs
  stay float32 behind one Cast each, so callers and Triton configs see the same interface;
- QuantizeLinear/DequantizeLinear take float16 scales from opset 19 on, so a Q/DQ graph converts
  whole there. Below opset 19 (or where a scale is outside float16's normal range) they stay float32
  and Casts go around them;
- ops named in ``keep_fp32`` (op types or node names, e.g. ``Softmax``) stay float32 with Casts
  around them; inputs that ONNX requires in float32 (Resize/Upsample scales) stay so;
- weights beyond float16's range are clamped to +-65504 and counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compress.errors import CompressError, first_line

_F32, _F16 = TensorProto.FLOAT, TensorProto.FLOAT16
_FP16_MAX = 65504.0
_FP16_TINY = 6.104e-05  # smallest normal float16: smaller Q/DQ scales lose precision as subnormals
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_SUBGRAPH_OPS = ("If", "Loop", "Scan")
# Inputs ONNX only accepts in float32 whatever the other inputs are: (op type) -> input indices.
_FLOAT32_INPUTS = {"Resize": (2,), "Upsample": (1,)}
# Ops whose float output type comes from an attribute, not from their inputs.
_ATTR_TYPED = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "EyeLike", "Bernoulli")


@dataclass
class Fp16Info:
    """What the conversion did: ``casts`` inserted, ``fp32_nodes`` kept in float32 (and why), ``clamped``
    weight values outside float16's range."""

    opset: int
    casts: int = 0
    fp16_initializers: int = 0
    fp32_nodes: dict[str, str] = field(default_factory=dict)
    clamped: int = 0

    def to_dict(self) -> dict[str, object]:
        return {"opset": self.opset, "casts": self.casts, "fp16_initializers": self.fp16_initializers,
                "fp32_nodes": self.fp32_nodes, "clamped_weights": self.clamped}


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named tensor (after shape inference)."""
    types: dict[str, int] = {}
    graph = model.graph
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def _qdq_scale_fits(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> bool:
    scale = consts.get(node.input[1])
    if scale is None:
        return False
    s = np.abs(scale.astype(np.float64))
    return bool(np.all((s >= _FP16_TINY) & (s <= _FP16_MAX)))


def to_fp16(model: onnx.ModelProto, *, keep_fp32: Iterable[str] = ()) -> tuple[onnx.ModelProto, Fp16Info]:
    """A float16 copy of ``model`` (float32 I/O kept). See the module docstring for what stays float32.

    Raises:
        CompressError: the graph has subgraphs (If/Loop/Scan) or ops with attribute-typed random/eye
            outputs, or a tensor's type cannot be inferred.
    """
    keep = set(keep_fp32)
    opset = _opset(model)
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise CompressError(f"fp16: ONNX shape inference fails on the graph: {first_line(exc)}") from None
    graph = model.graph
    info = Fp16Info(opset=opset)
    for node in graph.node:
        if node.op_type in _SUBGRAPH_OPS or node.op_type in _ATTR_TYPED:
            raise CompressError(f"fp16: node {node.name or node.output[0]} ({node.op_type}) is not supported; "
                                "convert this model with precision fp32")
    types = _elem_types(model)
    consts = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in consts:  # the exporter's shared-initializer alias
            consts[node.output[0]] = consts[node.input[0]]

    # Which nodes stay float32.
    pinned: dict[str, str] = {}
    for i, node in enumerate(graph.node):
        key = node.name or f"#{i}:{node.op_type}"
        if node.op_type in keep or node.name in keep:
            pinned[key] = "keep_fp32"
        elif node.op_type in _QDQ and opset < 19:
            pinned[key] = f"opset {opset} < 19: Q/DQ scales must be float32"
        elif node.op_type in _QDQ and not _qdq_scale_fits(node, consts):
            pinned[key] = "scale outside float16's normal range"
    keys = [node.name or f"#{i}:{node.op_type}" for i, node in enumerate(graph.node)]
    info.fp32_nodes = {k: pinned[k] for k in keys if k in pinned}

    def is_float(name: str) -> bool:
        if name not in types:
            raise CompressError(f"fp16: the type of tensor '{name}' cannot be inferred")
        return types[name] == _F32

    def wants(node_index: int, node: onnx.NodeProto, k: int) -> int:
        if keys[node_index] in pinned or k in _FLOAT32_INPUTS.get(node.op_type, ()):
            return _F32
        return _F16

    # Storage type of each float tensor.
    graph_inputs = {vi.name for vi in graph.input}
    uses: dict[str, set[int]] = {}
    for i, node in enumerate(graph.node):
        for k, name in enumerate(node.input):
            if name and is_float(name):
                uses.setdefault(name, set()).add(wants(i, node, k))
    storage: dict[str, int] = {}
    for name in graph_inputs:
        if types.get(name) == _F32:
            storage[name] = _F32
    for init in graph.initializer:
        if init.data_type == _F32 and init.name not in graph_inputs:
            storage[init.name] = _F16 if uses.get(init.name, {_F16}) == {_F16} else _F32
    for i, node in enumerate(graph.node):
        for name in node.output:
            if not name or types.get(name) != _F32:
                continue
            if node.op_type == "Constant":
                storage[name] = _F16 if uses.get(name, {_F16}) == {_F16} else _F32
            else:
                storage[name] = _F32 if keys[i] in pinned else _F16

    # Convert initializers and Constant values stored as float16.
    for init in graph.initializer:
        if storage.get(init.name) == _F16:
            init.CopyFrom(_to_fp16_tensor(numpy_helper.to_array(init), init.name, info))
            info.fp16_initializers += 1

    new_nodes: list[onnx.NodeProto] = []
    cast_of: dict[tuple[str, int], str] = {}

    def cast(name: str, to: int) -> str:
        if (name, to) not in cast_of:
            out = f"{name}__to_{'fp16' if to == _F16 else 'fp32'}"
            new_nodes.append(helper.make_node("Cast", [name], [out], name=f"{out}_cast", to=to))
            cast_of[(name, to)] = out
            info.casts += 1
        return cast_of[(name, to)]

    for i, node in enumerate(graph.node):
        for k, name in enumerate(node.input):
            if name in storage:
                want = wants(i, node, k)
                if storage[name] != want:
                    node.input[k] = cast(name, want)
        if keys[i] not in pinned:
            if node.op_type == "Constant" and storage.get(node.output[0]) == _F16:
                value = helper.get_attribute_value(node.attribute[0])
                array = numpy_helper.to_array(value) if isinstance(value, TensorProto) else np.asarray(value, np.float32)
                del node.attribute[:]
                node.attribute.append(helper.make_attribute("value", _to_fp16_tensor(array, "", info)))
            elif node.op_type == "Cast":
                to = next(a for a in node.attribute if a.name == "to")
                if to.i == _F32:
                    to.i = _F16
            elif node.op_type == "ConstantOfShape":
                for attr in node.attribute:
                    if attr.name == "value" and attr.t.data_type == _F32:
                        attr.t.CopyFrom(_to_fp16_tensor(numpy_helper.to_array(attr.t), attr.t.name, info))
        new_nodes.append(node)

    # Graph outputs keep float32: the producer writes NAME__fp16, a Cast writes NAME.
    for out in graph.output:
        if storage.get(out.name) == _F16:
            inner = f"{out.name}__fp16"
            for node in new_nodes:
                node.output[:] = [inner if o == out.name else o for o in node.output]
                node.input[:] = [inner if x == out.name else x for x in node.input]
            new_nodes.append(helper.make_node("Cast", [inner], [out.name], name=f"{out.name}_cast", to=_F32))
            info.casts += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.value_info[:]
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise CompressError(f"fp16: the converted graph is not valid ONNX: {first_line(exc)}") from None
    return model, info


def _to_fp16_tensor(array: np.ndarray, name: str, info: Fp16Info) -> TensorProto:
    over = np.abs(array) > _FP16_MAX
    info.clamped += int(np.count_nonzero(over & np.isfinite(array)))
    return numpy_helper.from_array(np.clip(array, -_FP16_MAX, _FP16_MAX).astype(np.float16), name)
