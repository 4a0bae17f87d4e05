"""The inputs an ONNX file declares (name, shape, dtype), and a one-sample input built from them.

``compress bench model.onnx`` needs no ``--data``: the batch dimension comes from ``--batch-sizes``, every
other dimension from the file, and a dynamic one from ``--input-shape`` (or a one-line error naming it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.errors import CompressError, did_you_mean, first_line
from compress.inputs import Inputs
from compress.io import file_problem

_log = logging.getLogger(__name__)

# ONNX TensorProto element types bench can generate values for
_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 6: torch.int32, 7: torch.int64, 9: torch.bool,
           10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


@dataclass(frozen=True)
class DeclaredInput:
    """One graph input: ``dims`` holds an int for a fixed size, the dimension's name (``"?"`` when it has
    none) for a dynamic one; ``None`` when the file declares no shape at all."""

    name: str
    dims: tuple[int | str, ...] | None
    dtype: torch.dtype

    def shape_text(self) -> str:
        return "unknown" if self.dims is None else "[" + ", ".join(map(str, self.dims)) + "]"


def graph_inputs(path: Path) -> list:  # list[onnx.ValueInfoProto]; onnx imported on use
    """The graph inputs of an ONNX file that are not initializers (old exporters list weights as inputs too).

    Raises:
        CompressError: the file is not a readable ONNX file.
    """
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # protobuf's DecodeError and friends
        raise CompressError(f"{path}: not a readable ONNX file ({first_line(exc)})") from None
    weights = {init.name for init in graph.initializer}
    return [value for value in graph.input if value.name not in weights]


def declared_inputs(path: str | os.PathLike[str]) -> list[DeclaredInput]:
    """The graph inputs of the ONNX file ``path`` (initializers listed as inputs left out).

    Raises:
        CompressError: the file is missing or not ONNX, or an input is not a tensor of a type bench can fill.
    """
    file = Path(path)
    if (problem := file_problem(file)) is not None:
        raise CompressError(f"{file}: {problem}")
    found = []
    for value in graph_inputs(file):
        if not value.type.HasField("tensor_type"):
            raise CompressError(f"{file}: input '{value.name}' is not a tensor; bench feeds tensors only")
        tensor = value.type.tensor_type
        dtype = _DTYPES.get(tensor.elem_type)
        if dtype is None:
            import onnx

            kind = onnx.TensorProto.DataType.Name(tensor.elem_type)
            raise CompressError(f"{file}: input '{value.name}' is of type {kind}, which bench cannot generate")
        dims = None
        if tensor.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
                         for d in tensor.shape.dim)
        found.append(DeclaredInput(value.name, dims, dtype))
    if not found:
        raise CompressError(f"{file}: declares no inputs to feed")
    return found


def parse_shape_args(values: Sequence[str]) -> dict[str | None, list[int]]:
    """``--input-shape`` values, ``D1,D2,...`` or ``NAME=D1,D2,...`` (batch left out), by input name
    (``None`` for an unnamed one).

    Raises:
        CompressError: a value is not a list of positive integers, or names an input twice.
    """
    shapes: dict[str | None, list[int]] = {}
    for value in values:
        name, sep, dims_text = value.rpartition("=") if "=" in value else (None, "", value)
        key = name.strip() if sep and name is not None else None
        try:
            dims = [int(d) for d in dims_text.split(",")] if dims_text.strip() else []
        except ValueError:
            raise CompressError(f"bench --input-shape: '{value}' is not a list of integers like 1,8,8 "
                                "(or NAME=1,8,8)") from None
        if any(d <= 0 for d in dims):
            raise CompressError(f"bench --input-shape: '{value}' has a dimension <= 0")
        if key in shapes:
            raise CompressError(f"bench --input-shape: {'input ' + repr(key) if key else 'the shape'} is given twice")
        shapes[key] = dims
    return shapes


def _resolve(path: Path, declared: DeclaredInput, given: list[int] | None, batch_sizes: Sequence[int]) -> list[int]:
    """One sample's shape (batch 1) for ``declared``: ``given`` dims after the batch, else the file's."""
    where = f"{path}: input '{declared.name}' {declared.shape_text()}"
    dims = declared.dims
    if dims is not None and not dims:
        raise CompressError(f"{where} is a scalar; bench times batches along the first dimension")
    if dims is not None and isinstance(dims[0], int):
        wrong = [b for b in batch_sizes if b != dims[0]]
        if wrong:
            raise CompressError(f"{where} has a fixed batch dimension of {dims[0]}; --batch-sizes {wrong[0]} cannot "
                                f"run (use --batch-sizes {dims[0]})")
    if given is not None:
        fixed = dims[1:] if dims is not None else None
        if fixed is not None and (len(fixed) != len(given)
                                  or any(isinstance(f, int) and f != g for f, g in zip(fixed, given, strict=True))):
            raise CompressError(f"--input-shape {','.join(map(str, given))}: {where} takes "
                                f"[{', '.join(map(str, fixed))}] after the batch")
        return [1, *given]
    if dims is None:
        raise CompressError(f"{where}: the file declares no shape; give it with --input-shape {declared.name}=D1,D2,...")
    for i, d in enumerate(dims[1:], start=1):
        if not isinstance(d, int):
            raise CompressError(f"{where}: dimension {i} ('{d}') is dynamic; give its size with --input-shape "
                                f"{declared.name}=" + ",".join(str(x) if isinstance(x, int) else "N" for x in dims[1:]))
    return [1, *dims[1:]]  # type: ignore[list-item]  (all ints, checked above)


def sample_from_declared(
    path: str | os.PathLike[str], shapes: Mapping[str | None, list[int]], batch_sizes: Sequence[int]
) -> Inputs:
    """A batch of one sample for the ONNX file ``path``: one tensor, or ``{name: tensor}`` for several inputs.

    Float inputs are seeded normal noise; integer and boolean ones are ones (a valid token id, an attention
    mask that attends): latency depends on the shapes, not on the values.

    Args:
        shapes: ``--input-shape`` values by input name (:func:`parse_shape_args`); ``None`` keys the one
            input of a single-input model.
        batch_sizes: the batch sizes to be timed, checked against a fixed batch dimension.

    Raises:
        CompressError: a dynamic dimension without a size, a shape that does not fit, an unknown input name.
    """
    file = Path(path)
    inputs = declared_inputs(file)
    names = [d.name for d in inputs]
    by_name = dict(shapes)
    if None in by_name:
        if len(inputs) > 1:
            raise CompressError(f"--input-shape: {file} takes {len(inputs)} inputs ({', '.join(names)}); name each, "
                                f"e.g. --input-shape {names[0]}=...")
        by_name[names[0]] = by_name.pop(None)
    for key in by_name:
        if key not in names:
            raise CompressError(f"--input-shape {key}=...: {file} has no input '{key}' (inputs: {', '.join(names)})"
                                f"{did_you_mean(str(key), names)}")
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for declared in inputs:
        shape = _resolve(file, declared, by_name.get(declared.name), batch_sizes)
        if declared.dtype.is_floating_point:
            tensors[declared.name] = torch.randn(shape, generator=generator).to(declared.dtype)
        else:
            tensors[declared.name] = torch.ones(shape, dtype=declared.dtype)
    _log.debug("bench: inputs read from %s: %s", file, ", ".join(
        f"{name} {list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for name, t in tensors.items()))
    return next(iter(tensors.values())) if len(tensors) == 1 else tensors
