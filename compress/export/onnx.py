"""PyTorch -> ONNX (TorchScript exporter, ``dynamo=False``: the path that yields opset 13)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from compress import io
from compress.errors import CompressError, first_line

INPUT_NAME, OUTPUT_NAME = "input", "output"


@dataclass(frozen=True)
class OnnxInfo:
    path: Path
    opset: int
    nodes: int
    qdq_pairs: int


def count_qdq_pairs(model: onnx.ModelProto) -> int:
    """QuantizeLinear nodes whose output feeds a DequantizeLinear."""
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    return sum(
        1
        for node in model.graph.node
        if node.op_type == "QuantizeLinear" and "DequantizeLinear" in consumers.get(node.output[0], [])
    )


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    opset: int = 13,
    dynamic_batch: bool = True,
) -> OnnxInfo:
    """Export ``model`` (in eval mode, on the CPU) to ``path`` atomically and run ``onnx.checker``.

    Raises:
        CompressError: the model cannot be traced/exported, or the result fails the checker.
    """
    path = Path(path)
    was_training = model.training
    device = next(model.parameters(), torch.empty(0)).device
    model.eval().cpu()
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    try:
        with io.atomic_path(path) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated but is what gives opset 13
            try:
                torch.onnx.export(
                    model,
                    (example_input.cpu(),),
                    str(tmp),
                    opset_version=opset,
                    dynamo=False,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes=axes,
                    do_constant_folding=True,
                )
            except Exception as exc:  # tracer/exporter failures come as many types
                raise CompressError(f"ONNX export failed: {first_line(exc)}") from None
            proto = onnx.load(str(tmp))
            try:
                onnx.checker.check_model(proto, full_check=True)
            except onnx.checker.ValidationError as exc:
                raise CompressError(f"exported ONNX fails onnx.checker: {first_line(exc)}") from None
    finally:
        model.to(device).train(was_training)
    opsets = {o.domain: o.version for o in proto.opset_import}
    return OnnxInfo(path, opsets.get("", opsets.get("ai.onnx", opset)), len(proto.graph.node), count_qdq_pairs(proto))
