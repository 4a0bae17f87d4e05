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

import functools
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
_WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
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

    keys = [node.name or f"#{i}:{node.op_type}" for i, node in enumerate(graph.node)]
    unknown = sorted(keep - {n.op_type for n in graph.node} - {n.name for n in graph.node})
    if unknown:
        raise CompressError(f"fp16: keep_fp32 {unknown} match no op type or node name in the graph")
    pinned = _pinned(graph, keys, types, consts, keep, opset)
    info.fp32_nodes = {k: pinned[k] for k in keys if k in pinned}

    def is_float(name: str) -> bool:
        if name not in types:
            raise CompressError(f"fp16: the type of tensor '{name}' cannot be inferred")
        return types[name] == _F32

    def wants(node_index: int, node: onnx.NodeProto, k: int) -> int:
        if keys[node_index] in pinned or k in _float32_inputs(node, opset):
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
            if node.op_type == "Constant" and keys[i] not in pinned:
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
            elif node.op_type == "ConstantOfShape" and storage.get(node.output[0]) == _F16:
                value = next((a for a in node.attribute if a.name == "value"), None)
                if value is None:  # the default value is a float32 zero
                    node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float16))))
                elif value.t.data_type == _F32:
                    value.t.CopyFrom(_to_fp16_tensor(numpy_helper.to_array(value.t), value.t.name, info))
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
    info.clamped += int(np.count_nonzero(np.abs(array) > _FP16_MAX))  # infinities included
    return numpy_helper.from_array(np.clip(array, -_FP16_MAX, _FP16_MAX).astype(np.float16), name)


@functools.cache
def _schema(op_type: str, opset: int, domain: str) -> onnx.defs.OpSchema | None:
    try:
        return onnx.defs.get_schema(op_type, opset, domain)
    except Exception:  # a custom op: no schema to consult
        return None


def _formal(schema: onnx.defs.OpSchema, k: int) -> onnx.defs.OpSchema.FormalParameter | None:
    inputs = schema.inputs
    if k < len(inputs):
        return inputs[k]
    last = inputs[-1] if inputs else None
    return last if last is not None and last.option == onnx.defs.OpSchema.FormalParameterOption.Variadic else None


def _float32_inputs(node: onnx.NodeProto, opset: int) -> set[int]:
    """Inputs whose ONNX type is float32 alone, whatever the other inputs are (Resize's scales)."""
    schema = _schema(node.op_type, opset, node.domain)
    if schema is None:
        return set()
    return {k for k in range(len(node.input)) if (f := _formal(schema, k)) is not None and f.type_str == "tensor(float)"}


def _no_float16(node: onnx.NodeProto, opset: int) -> bool:
    """Whether the op has no float16 type where it takes float32 (Range; CumSum below opset 14; ...)."""
    schema = _schema(node.op_type, opset, node.domain)
    if schema is None:
        return False
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    return any("tensor(float)" in allowed.get(f.type_str, ()) and "tensor(float16)" not in allowed.get(f.type_str, ())
               for f in [*schema.inputs, *schema.outputs])


def _pinned(graph: onnx.GraphProto, keys: list[str], types: dict[str, int], consts: dict[str, np.ndarray],
            keep: set[str], opset: int) -> dict[str, str]:
    """The nodes that stay float32, with the reason."""
    pinned: dict[str, str] = {}
    derived: set[str] = set()  # float tensors computed from tensor shapes (or other integers) alone
    for key, node in zip(keys, graph.node, strict=True):
        floats_in = [x for x in node.input if x and types.get(x) == _F32]
        floats_out = [y for y in node.output if y and types.get(y) == _F32]
        if node.op_type == "Cast" and floats_out and types.get(node.input[0]) not in (_F32, _F16):
            derived.update(floats_out)
        elif (floats_out and any(x in derived for x in floats_in)
              and all(x in derived or x in consts for x in floats_in)):
            derived.update(floats_out)
        if node.op_type in keep or node.name in keep:
            pinned[key] = "keep_fp32"
        elif any(x in derived for x in floats_in) or (floats_out and all(y in derived for y in floats_out)):
            pinned[key] = "uses values computed from tensor shapes, which float16 may not hold exactly"
        elif node.op_type in _QDQ and opset < 19:
            pinned[key] = f"opset {opset} < 19: Q/DQ scales must be float32"
        elif node.op_type in _QDQ and not _qdq_scale_fits(node, consts):
            pinned[key] = "scale outside float16's normal range"
        elif (floats_in or floats_out) and _no_float16(node, opset):
            pinned[key] = f"{node.op_type} has no float16 type in opset {opset}"
    # A quantized op and its Q/DQ stay together, so no Cast comes between a DQ and the op it feeds:
    # TensorRT fuses DQ -> op -> Q into an INT8 kernel only when they are adjacent.
    producer = {y: (k, n) for k, n in zip(keys, graph.node, strict=True) for y in n.output}
    consumers: dict[str, list[tuple[str, onnx.NodeProto]]] = {}
    for k, n in zip(keys, graph.node, strict=True):
        for x in n.input:
            consumers.setdefault(x, []).append((k, n))

    def scale_path(name: str) -> list[tuple[str, onnx.NodeProto]]:
        """The Identity nodes between a Q/DQ scale input and its initializer (the exporter's shared alias)."""
        chain = []
        while (p := producer.get(name)) is not None and p[1].op_type == "Identity":
            chain.append(p)
            name = p[1].input[0]
        return chain

    def scale_source(node: onnx.NodeProto) -> str:
        chain = scale_path(node.input[1])
        return str(chain[-1][1].input[0] if chain else node.input[1])

    sharing: dict[str, list[tuple[str, onnx.NodeProto]]] = {}
    for k, n in zip(keys, graph.node, strict=True):
        if n.op_type in _QDQ:
            sharing.setdefault(scale_source(n), []).append((k, n))
    changed = True
    while changed:
        changed = False
        for key, node in zip(keys, graph.node, strict=True):
            if key not in pinned:
                continue
            related: list[tuple[str, onnx.NodeProto]] = []
            if node.op_type in _QDQ:  # Q/DQ sharing one scale tensor share its type, and so its precision
                related += sharing.get(scale_source(node), []) + scale_path(node.input[1])
            if node.op_type == "DequantizeLinear":
                related += [p for p in [producer.get(node.input[0])] if p and p[1].op_type == "QuantizeLinear"]
                related += [c for c in consumers.get(node.output[0], []) if c[1].op_type in _WEIGHTED]
            elif node.op_type == "QuantizeLinear":
                related += [c for c in consumers.get(node.output[0], []) if c[1].op_type == "DequantizeLinear"]
            elif node.op_type in _WEIGHTED:
                related += [p for x in node.input if (p := producer.get(x)) and p[1].op_type == "DequantizeLinear"]
            for other, _ in related:
                if other not in pinned:
                    pinned[other] = f"runs with {key} ({pinned[key]})"
                    changed = True
    return pinned
