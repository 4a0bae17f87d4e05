"""What of a quantized model runs INT8 in an ONNX Runtime engine.

Every Conv/ConvTranspose/Gemm/MatMul the optimised engine still runs in float is listed with the
layer it came from and why it is float, and the share of the model's weighted-op MACs (one sample,
from the shapes in the exported ONNX) that INT8 kernels run. Engine nodes are matched to the
exported ONNX by name (ONNX Runtime keeps the node's name, adding a suffix when it fuses), and
exported nodes to modules by the scope path ``torch.onnx`` writes into the name
(``/features/features.1/conv/conv.0/Conv`` is ``features.1.conv.0``).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import onnx
from torch import nn

from compress.export.onnxruntime import FLOAT_WEIGHTED, INT8_WEIGHTED
from compress.export.qdq import WEIGHTED_OPS, Graph
from compress.quant.insert import Skip, plan_of, target_of
from compress.quant.keep_float import float_units
from compress.quant.layers import QUANT_LAYERS, QuantLayer
from compress.quant.spec import Target


class FloatReason(str, Enum):
    """Why a weighted op runs in float in the engine."""

    excluded = "excluded"  # the recipe's exclude patterns
    not_included = "not_included"  # include patterns were given and none matches
    never_called = "never_called"  # forward never calls the layer as a module
    attention_matmul = "attention_matmul"  # activation x activation MatMul (attention scores, A.V): not quantized
    unsupported_layer = "unsupported_layer"  # a module type compress does not quantize
    functional = "functional"  # a functional op with a weight, outside any layer
    not_quantized = "not_quantized"  # a quantizable layer prepare() did not touch (no plan recorded)
    not_fused = "not_fused"  # quantized, but ONNX Runtime found no INT8 kernel for its Q/DQ group
    kept_float = "kept_float"  # its quantizers disabled on purpose (an accuracy budget, compress.quant.keep_float)
    unmatched = "unmatched"  # no engine node of a known kind came from it (fused into another op, or folded)


_FROM_PLAN = {Skip.excluded: FloatReason.excluded, Skip.not_included: FloatReason.not_included,
              Skip.never_called: FloatReason.never_called}


@dataclass(frozen=True)
class FloatOp:
    """One weighted op the engine runs in float."""

    layer: str  # module path ('' for the model's own forward)
    node: str  # the node's name in the exported ONNX
    op: str  # its op type in the engine (Conv, FusedConv, Gemm, MatMul, ...)
    reason: FloatReason
    detail: str
    macs: int  # per sample


@dataclass(frozen=True)
class Coverage:
    """The float ops and the MACs INT8 kernels run, out of all weighted-op MACs."""

    not_int8: list[FloatOp]
    int8_macs: int
    weighted_macs: int
    # layers the recipe kept out of quantization that the engine runs in INT8 all the same: ONNX Runtime
    # quantizes a float weight itself when the op's input and output are quantized
    int8_unplanned: list[str] = field(default_factory=list)

    @property
    def int8_macs_fraction(self) -> float:
        return self.int8_macs / self.weighted_macs if self.weighted_macs else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"not_int8": [{**asdict(f), "reason": f.reason.value} for f in self.not_int8],
                "int8_macs": self.int8_macs, "weighted_macs": self.weighted_macs,
                "int8_macs_fraction": round(self.int8_macs_fraction, 4), "int8_unplanned": self.int8_unplanned}


def layer_of(node_name: str) -> str:
    """The module path in a ``torch.onnx`` node name: each scope segment is an attribute name, or the
    previous segment plus ``.attr`` for children of containers (``/features/features.1/conv/Conv``)."""
    parts = node_name.split("/")[1:-1] if node_name.startswith("/") else []
    path: list[str] = []
    prev = None
    for seg in parts:
        path.append(seg[len(prev) + 1:] if prev is not None and seg.startswith(prev + ".") else seg)
        prev = seg
    return ".".join(path)


_THROUGH = ("DequantizeLinear", "QuantizeLinear", "Identity", "Cast", "Transpose", "Reshape", "Unsqueeze")
_PARAM_SUFFIXES = (".weight_quantized", ".weight", ".in_proj_weight")


def _weight_owner(node: onnx.NodeProto, graph: Graph, model: nn.Module) -> str | None:
    """The module whose weight feeds ``node``, from the weight initializer's name (``layer2.0.conv1.weight``).

    Scopes in node names are not enough: a model traced by torch.fx exports ``/conv1_3/Conv`` for
    ``layer2.0.conv1``, but the initializer keeps the parameter's name.
    """
    modules = dict(model.named_modules())
    for name in node.input[:2]:
        seen = 0
        while name in graph.producer and graph.producer[name].op_type in _THROUGH and seen < 8:
            name, seen = graph.producer[name].input[0], seen + 1
        for suffix in _PARAM_SUFFIXES:
            if name.endswith(suffix) and name[: -len(suffix)] in modules:
                return name[: -len(suffix)]
    return None


def locate(node: onnx.NodeProto, graph: Graph, model: nn.Module) -> tuple[str, nn.Module]:
    """The layer an exported weighted op belongs to: its weight's owner, else the scope in its name."""
    owner = _weight_owner(node, graph, model)
    return (owner, model.get_submodule(owner)) if owner else _module(model, layer_of(node.name))


def _module(model: nn.Module, layer: str) -> tuple[str, nn.Module]:
    """The deepest existing module on ``layer``'s path, and its name."""
    parts = layer.split(".") if layer else []
    while parts:
        try:
            return ".".join(parts), model.get_submodule(".".join(parts))
        except AttributeError:
            parts.pop()
    return "", model


def _shapes(model: onnx.ModelProto, names: list[str]) -> tuple[dict[str, tuple[int, ...]], int]:
    """The shapes of ``names`` on one run of the graph as written (symbolic dims, the batch, as 1), and the
    batch it ran at. Running beats static shape inference, which loses ranks at shape-computed reshapes."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names) if n not in have)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds, batch = {}, 1
    for i, value in enumerate(session.get_inputs()):
        dims = [d if isinstance(d, int) and d > 0 else 1 for d in value.shape]
        batch = dims[0] if i == 0 and dims else batch
        dtype = onnx.helper.tensor_dtype_to_np_dtype(
            next(v.type.tensor_type.elem_type for v in probe.graph.input if v.name == value.name))
        feeds[value.name] = np.zeros(dims, dtype)
    outs = session.run(None, feeds)
    return {o.name: tuple(r.shape) for o, r in zip(session.get_outputs(), outs, strict=True)}, max(batch, 1)


def node_macs(model: onnx.ModelProto) -> dict[str, int]:
    """MACs of one sample per weighted node (Conv, ConvTranspose, Gemm, MatMul) of an exported ONNX.

    Raises:
        Exception: ONNX Runtime cannot run the graph on zeros (the caller reports it).
    """
    nodes = [n for n in model.graph.node if n.op_type in WEIGHTED_OPS]
    shapes, batch = _shapes(model, [x for n in nodes for x in (n.input[0], n.input[1], n.output[0])])
    out: dict[str, int] = {}
    for node in nodes:
        a, b, y = (shapes[n] for n in (node.input[0], node.input[1], node.output[0]))
        if node.op_type == "Conv":
            out[node.name] = int(np.prod(y[1:]) * np.prod(b[1:]))
        elif node.op_type == "ConvTranspose":  # each input element scatters into out/groups x kernel outputs
            out[node.name] = int(np.prod(a[1:]) * np.prod(b[1:]))
        elif node.op_type == "Gemm":  # rows are samples
            trans_a = any(x.name == "transA" and x.i for x in node.attribute)
            out[node.name] = int(np.prod(y) * (a[0] if trans_a else a[-1])) // batch
        else:  # MatMul: the leading dims hold the batch
            out[node.name] = int(np.prod(y) * a[-1]) // batch
    return out


def _is_weight(graph: Graph, name: str) -> bool:
    """A constant, or a constant behind a DequantizeLinear (a quantized weight)."""
    if graph.const(name) is not None:
        return True
    producer = graph.producer.get(name)
    return producer is not None and producer.op_type == "DequantizeLinear" and graph.const(producer.input[0]) is not None


def _from_dq(graph: Graph, name: str) -> bool:
    producer = graph.producer.get(name)
    return producer is not None and producer.op_type == "DequantizeLinear"


def _output_quantized(graph: Graph, node: onnx.NodeProto) -> bool:
    """The node's output goes into a QuantizeLinear (directly or through a Relu/Clip ONNX Runtime folds)."""
    users = graph.consumers.get(node.output[0], [])
    if any(u.op_type == "QuantizeLinear" for u in users):
        return True
    return any(u.op_type in ("Relu", "Clip") and _output_quantized(graph, u) for u in users)


def _why_float(node: onnx.NodeProto, graph: Graph, model: nn.Module, target: Target | None, fuses: bool
               ) -> tuple[str, FloatReason, str]:
    layer, module = locate(node, graph, model)
    weighted = [i for i in node.input[:2] if _is_weight(graph, i)]
    if node.op_type == "MatMul" and not weighted:
        return layer, FloatReason.attention_matmul, "activation x activation MatMul (e.g. attention Q.K^T, A.V); not quantized"
    skipped = plan_of(model).skipped
    if layer in skipped:
        why, detail = skipped[layer]
        return layer, _FROM_PLAN[why], detail
    if isinstance(module, QuantLayer):
        if layer in float_units(model):
            return layer, FloatReason.kept_float, "kept float (its quantizers disabled by an accuracy budget or keep_float)"
        if not _from_dq(graph, node.input[1]):
            return layer, FloatReason.never_called, "its weight quantizer never ran: forward uses the weight outside the layer"
        if not fuses:
            return layer, FloatReason.not_fused, "graph optimization disabled: ONNX Runtime runs Q/DQ as float ops"
        if target is Target.tensorrt:
            return layer, FloatReason.not_fused, ("Q/DQ placed for TensorRT; ONNX Runtime has no INT8 kernel for "
                                                  "this placement and runs it in float")
        if not _from_dq(graph, node.input[0]):
            return layer, FloatReason.not_fused, "its input is not quantized"
        if not _output_quantized(graph, node):
            return layer, FloatReason.not_fused, ("its output is not quantized (the next op is float), and ONNX "
                                                  "Runtime fuses only DQ -> op -> Q")
        return layer, FloatReason.not_fused, "ONNX Runtime did not fuse its Q/DQ group into an INT8 kernel"
    if type(module) in QUANT_LAYERS and layer:
        return layer, FloatReason.not_quantized, "not quantized by compress.quant.prepare"
    if not layer:
        return layer, FloatReason.functional, f"a {node.op_type} with a weight called in forward, outside any layer"
    kinds = ", ".join(t.__name__ for t in QUANT_LAYERS)
    return layer, FloatReason.unsupported_layer, f"{type(module).__name__} is not a layer type compress quantizes ({kinds})"


def _source_of(engine_name: str, names: list[str]) -> str | None:
    """The exported node an engine node came from: the same name, or it plus ONNX Runtime's ``/Suffix`` or
    ``_token_N`` (its level-``all`` fusions)."""
    engine_name = re.sub(r"_token_\d+$", "", engine_name)
    if engine_name in names:
        return engine_name
    prefixed = [n for n in names if engine_name.startswith(n + "/")]
    return max(prefixed, key=len) if prefixed else None


def coverage(source: str | os.PathLike[str], engine: str | os.PathLike[str], model: nn.Module, *, fuses: bool = True
             ) -> Coverage:
    """Which weighted ops of ``source`` (the exported ONNX) the optimised ``engine`` runs in INT8.

    Args:
        source: the ONNX file the engine was built from.
        engine: ONNX Runtime's optimised model (``engine.onnx``).
        model: the quantized model that was exported (its quantization plan names skipped layers).
        fuses: whether the engine was optimised (``False`` at level ``disabled``: nothing is fused).
    """
    exported = onnx.load(str(source), load_external_data=False)
    graph = Graph(exported)
    macs = node_macs(exported)
    nodes = {n.name: n for n in exported.graph.node if n.op_type in WEIGHTED_OPS and n.name}
    names = list(nodes)
    target = target_of(model)
    float_ops: list[FloatOp] = []
    unplanned: list[str] = []
    skipped = plan_of(model).skipped
    kept_float = set(float_units(model))
    int8 = 0
    seen: set[str] = set()
    for enode in onnx.load(str(engine), load_external_data=False).graph.node:
        origin = _source_of(enode.name, names)
        if origin is None or origin in seen:
            continue
        if enode.op_type in INT8_WEIGHTED:
            seen.add(origin)
            int8 += macs[origin]
            layer, _ = locate(nodes[origin], graph, model)
            if layer in kept_float or (layer in skipped and skipped[layer][0] in (Skip.excluded, Skip.not_included)):
                unplanned.append(layer)
        elif enode.op_type in FLOAT_WEIGHTED:
            seen.add(origin)
            layer, reason, detail = _why_float(nodes[origin], graph, model, target, fuses)
            float_ops.append(FloatOp(layer, origin, enode.op_type, reason, detail, macs[origin]))
    for name in names:  # so that INT8 + float MACs add up to every weighted op's
        if name not in seen:
            layer, _ = locate(nodes[name], graph, model)
            float_ops.append(FloatOp(layer, name, nodes[name].op_type, FloatReason.unmatched,
                                     "no INT8 or float weighted op in the engine came from it: ONNX Runtime fused it "
                                     "into another op or folded it away", macs[name]))
    return Coverage(float_ops, int8, sum(macs.values()), unplanned)

