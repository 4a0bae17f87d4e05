"""Check 2:4 sparsity where it matters: in a model's weights, or in an ONNX file's weights after dequantization.

A layer counts as sparse when every group of 4 consecutive input-channel weights has at most 2
nonzeros *and* its shape is one sparse kernels accept (see :mod:`compress.sparsity.eligible`); a
2:4 weight of an ineligible shape is listed, but engines run it dense.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from compress.errors import CompressError, first_line
from compress.sparsity import eligible, targets
from compress.sparsity.pattern import PATTERN, M, N, rows


@dataclass
class LayerCheck:
    op: str
    shape: list[int]
    violations: int  # groups of 4 with more than 2 nonzeros
    groups: int
    density: float  # nonzero share of the weights
    ineligible: str | None = None  # why sparse kernels cannot run it, even if 2:4

    @property
    def is_2to4(self) -> bool:
        return self.groups > 0 and self.violations == 0

    @property
    def sparse(self) -> bool:
        return self.is_2to4 and self.ineligible is None

    def to_dict(self) -> dict[str, Any]:
        entry = {"op": self.op, "shape": self.shape, "2:4": self.is_2to4, "violations": self.violations,
                 "density": round(self.density, 4)}
        if self.ineligible:
            entry["ineligible"] = self.ineligible
        return entry


@dataclass
class SparsityCheck:
    """Per weighted layer, whether its weights are 2:4."""

    layers: dict[str, LayerCheck] = field(default_factory=dict)

    @property
    def sparse_layers(self) -> list[str]:
        return [name for name, c in self.layers.items() if c.sparse]

    def missing(self, expected: list[str]) -> list[str]:
        """The ``expected`` layers that are not 2:4 here (or not found).

        A float attention's packed ``<attention>.in_proj_weight`` may be found under ``<attention>``: the
        exporter folds it (transposed) into an anonymous constant, named then by the attention's scope.
        """
        def found(name: str) -> LayerCheck | None:
            alias = name.rpartition(".")[0] if targets.is_packed(name) else name
            return self.layers.get(name) or self.layers.get(alias)

        return [name for name in expected if (check := found(name)) is None or not check.is_2to4]

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": PATTERN, "sparse_layers": self.sparse_layers,
                "dense_layers": [n for n, c in self.layers.items() if not c.sparse],
                "layers": {n: c.to_dict() for n, c in self.layers.items()}}


def _check(op: str, weight: np.ndarray | torch.Tensor, ineligible: str | None) -> LayerCheck:
    w = torch.as_tensor(np.asarray(weight)) if not isinstance(weight, torch.Tensor) else weight.detach()
    flat = rows(w)
    if flat.shape[1] % M:
        return LayerCheck(op, list(w.shape), 0, 0, float((w != 0).float().mean()),
                          ineligible or f"input channels {flat.shape[1]} do not divide by {M}")
    nonzero = (flat.reshape(-1, M) != 0).sum(1)
    return LayerCheck(op, list(w.shape), int((nonzero > N).sum()), int(nonzero.numel()),
                      float(nonzero.sum()) / max(w.numel(), 1), ineligible)


def verify_model(model: nn.Module) -> SparsityCheck:
    """2:4 status of every Conv/Linear weight and packed attention q/k/v weight of ``model`` (fake-quantized layers:
    the weight they quantize)."""
    result = SparsityCheck()
    for name, module in model.named_modules():
        if isinstance(module, eligible.SPARSE_TYPES) and name:
            result.layers[name] = _check(type(module).__name__, module.weight, eligible.why_ineligible(module))
    for name, weight in targets.packed_weights(model).items():  # nn.MultiheadAttention's q/k/v, packed
        result.layers[name] = _check("MultiheadAttention", weight, eligible.shape_ineligible(*weight.shape[:2]))
    return result


def verify_onnx(path: str | os.PathLike[str]) -> SparsityCheck:
    """2:4 status of every Conv/Gemm/MatMul weight of an ONNX file, after dequantizing Q/DQ weights.

    Layers are named as the PyTorch modules they came from (``/layer1/conv1/Conv`` -> ``layer1.conv1``).

    Raises:
        CompressError: the file is missing or not a readable ONNX model.
    """
    from compress.export.qdq import Graph

    try:
        model = onnx.load(os.fspath(path))
    except Exception as exc:  # onnx raises DecodeError, OSError, ... on damaged files
        raise CompressError(f"{path}: is not a readable ONNX model ({first_line(exc)})") from None
    graph = Graph(model)
    result = SparsityCheck()
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        weight = _dequantized(graph, node.input[1])
        if weight is None:
            continue  # an activation x activation MatMul: no weights to check
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and not attrs.get("transB", 0) or node.op_type == "MatMul":
            weight = weight.T if weight.ndim == 2 else weight  # to [out, in]
        if weight.ndim < 2:
            continue
        groups = int(attrs.get("group", 1)) if node.op_type == "Conv" else 1
        ineligible = eligible.shape_ineligible(weight.shape[0], weight.shape[1], groups)
        result.layers[layer_name(node, _weight_source(graph, node.input[1]))] = _check(node.op_type, weight, ineligible)
    return result


def layer_name(node: onnx.NodeProto, weight: str = "") -> str:
    """The PyTorch module an exported weighted node came from.

    Our exporter names quantized weights ``<module>.weight_quantized`` and unfolded float weights
    ``<module>.weight`` (a float attention's packed ``<attention>.in_proj_weight`` keeps that name, as its
    2:4 mask does); otherwise the node's scope path is used (``/layer2/shortcut/shortcut.0/Conv``
    -> ``layer2.shortcut.0``: each scope level may repeat its parent's name as a prefix).
    """
    for suffix in (".weight_quantized", ".weight"):
        if weight.endswith(suffix) and not weight.startswith("onnx::"):
            return weight[: -len(suffix)]
    if targets.is_packed(weight) and not weight.startswith("onnx::"):  # a float attention's packed q/k/v weight
        return weight
    parts = [p for p in node.name.split("/") if p][:-1]
    path = ""
    for part in parts:
        tail = part.split(".")[-1] if path.endswith(part.rsplit(".", 1)[0]) and "." in part else part
        path = f"{path}.{tail}" if path else part
    return path or node.name or node.output[0]


def _weight_source(graph: Any, name: str) -> str:
    """The initializer a weight input comes from (through Identity, Cast, Transpose, DequantizeLinear, QuantizeLinear)."""
    name = graph._resolve(name)
    for _ in range(4):
        node = graph.producer.get(name)
        if node is None or node.op_type not in ("DequantizeLinear", "QuantizeLinear", "Transpose", "Cast"):
            break
        name = graph._resolve(node.input[0])
    return name


def _dequantized(graph: Any, name: str) -> np.ndarray | None:
    """The float value of a weight input: a constant, DequantizeLinear(constant), Q->DQ of a constant, or
    any of these behind a Transpose (a quantized Linear applied to [N, L, C] exports as DQ -> Transpose -> MatMul)."""
    value = graph.const(name)
    if value is not None:
        return value.astype(np.float32)
    node = graph.producer.get(graph._resolve(name))
    if node is not None and node.op_type == "Cast":  # a float16 graph casts a float32 DQ's output
        return _dequantized(graph, node.input[0])
    if node is not None and node.op_type == "Transpose":
        inner = _dequantized(graph, node.input[0])
        perm = next((list(onnx.helper.get_attribute_value(a)) for a in node.attribute if a.name == "perm"), None)
        return None if inner is None else np.transpose(inner, perm)
    if node is None or node.op_type != "DequantizeLinear":
        return None
    scale, zero = graph.const(node.input[1]), graph.const(node.input[2]) if len(node.input) > 2 else None
    source = graph.producer.get(graph._resolve(node.input[0]))
    quantized = graph.const(node.input[0])
    if quantized is None and source is not None and source.op_type == "QuantizeLinear":
        raw, q_scale = graph.const(source.input[0]), graph.const(source.input[1])
        if raw is None or q_scale is None:
            return None
        quantized = _quantize(raw, q_scale, graph.const(source.input[2]) if len(source.input) > 2 else None,
                              _axis(source))
    if quantized is None or scale is None:
        return None
    axis = _axis(node)
    zp = _along(zero.astype(np.float32), axis, quantized.ndim) if zero is not None else np.float32(0)
    return (quantized.astype(np.float32) - zp) * _along(scale.astype(np.float32), axis, quantized.ndim)


def _axis(node: onnx.NodeProto) -> int:
    return next((int(onnx.helper.get_attribute_value(a)) for a in node.attribute if a.name == "axis"), 1)


def _along(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """Per-channel ``values`` shaped to broadcast along ``axis`` of an ``ndim`` tensor (scalars stay)."""
    if values.ndim == 0 or values.size == 1 or ndim == 0:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def _quantize(raw: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int) -> np.ndarray:
    s = _along(scale.astype(np.float32), axis, raw.ndim)
    z = _along(zero.astype(np.float32), axis, raw.ndim) if zero is not None else 0.0
    low, high = (-128, 127) if zero is not None and zero.dtype == np.int8 else (0, 255)  # ONNX default: uint8
    return np.clip(np.round(raw.astype(np.float32) / s) + z, low, high)
