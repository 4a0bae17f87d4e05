"""A Triton Inference Server model repository for an exported model.

    DIR/triton/NAME/config.pbtxt     platform, max_batch_size, inputs/outputs (batch dim left out), dynamic batching
    DIR/triton/NAME/1/model.onnx     (onnxruntime backend)  or  1/model.plan (tensorrt backend)

The inputs and outputs are read from the ONNX graph, so the config always matches the file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import onnx

from compress import io
from compress.errors import CompressError

_DTYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.DOUBLE: "TYPE_FP64",
}
_PLATFORMS = {"onnxruntime": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan")}


def _tensors(values: list[onnx.ValueInfoProto], batched: bool, what: str) -> list[str]:
    blocks = []
    for value in values:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        if batched:
            if not dims or dims[0] != -1:
                raise CompressError(f"export.triton: {what} '{value.name}' has no dynamic batch dimension; "
                                    "set onnx.dynamic_batch: true or max_batch_size: 0")
            dims = dims[1:]
        dtype = _DTYPES.get(tensor.elem_type)
        if dtype is None:
            raise CompressError(f"export.triton: {what} '{value.name}' has an element type Triton config cannot name")
        blocks.append(f'  {{\n    name: "{value.name}"\n    data_type: {dtype}\n    dims: [ {", ".join(map(str, dims))} ]\n  }}')
    return blocks


def config_text(onnx_path: str | os.PathLike[str], name: str, max_batch_size: int, backend: str) -> str:
    """The ``config.pbtxt`` for ``onnx_path`` (whose graph gives the inputs and outputs)."""
    graph = onnx.load(os.fspath(onnx_path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    batched = max_batch_size > 0
    platform = _PLATFORMS[backend][0]
    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch_size}",
             "input [", ",\n".join(_tensors(inputs, batched, "input")), "]",
             "output [", ",\n".join(_tensors(list(graph.output), batched, "output")), "]"]
    if batched:
        lines += ["dynamic_batching {", "  max_queue_delay_microseconds: 100", "}"]
    lines += ["instance_group [ { count: 1, kind: " + ("KIND_GPU" if backend == "tensorrt" else "KIND_CPU") + " } ]"]
    return "\n".join(lines) + "\n"


def write_repository(
    root: str | os.PathLike[str],
    model_file: str | os.PathLike[str],
    onnx_path: str | os.PathLike[str],
    *,
    name: str,
    max_batch_size: int,
    backend: str = "onnxruntime",
) -> Path:
    """Write ``root/name/config.pbtxt`` and ``root/name/1/<model file>``; returns the model folder.

    Args:
        model_file: what Triton serves (the ONNX file, or a TensorRT plan).
        onnx_path: the ONNX graph the config's inputs and outputs are read from.

    Raises:
        CompressError: the graph has no dynamic batch dimension while ``max_batch_size`` > 0.
    """
    folder = Path(root) / name
    text = config_text(onnx_path, name, max_batch_size, backend)
    version = folder / "1"
    version.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(version / _PLATFORMS[backend][1]) as tmp:
        shutil.copyfile(model_file, tmp)
    io.write_text(folder / "config.pbtxt", text)
    return folder
