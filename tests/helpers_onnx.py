"""Tiny ONNX graphs written with ``onnx.helper`` (no export, milliseconds): inputs declared as a test needs them."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto
from onnx import helper as h


def relu_graph(path: Path, x_dims: list[int | str], mask_dims: list[int | str] | None = None) -> Path:
    """``output = relu(x)`` (float ``x`` of ``x_dims``), times ``float(mask)`` when an int64 ``mask`` is given.
    A str dim is a named dynamic dimension."""
    inputs = [h.make_tensor_value_info("x", TensorProto.FLOAT, x_dims)]
    nodes = [h.make_node("Relu", ["x"], ["output" if mask_dims is None else "r"])]
    if mask_dims is not None:
        inputs.append(h.make_tensor_value_info("mask", TensorProto.INT64, mask_dims))
        nodes += [h.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT), h.make_node("Mul", ["r", "m"], ["output"])]
    graph = h.make_graph(nodes, "g", inputs, [h.make_tensor_value_info("output", TensorProto.FLOAT, x_dims)])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    model.ir_version = 8  # readable by every onnxruntime the project supports
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
