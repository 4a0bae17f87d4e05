"""Output-level bounds the default check applies: float rounding for FP32 pairs, a calibrated drift bound
for an engine against its own saved outputs.

Both are measured as ``max |out - ref| / rms(ref)`` over every output value of the check data: one
number, free of the outputs' scale, that a weight change in any layer moves (a logit-scale change such
as a head x1.1 included, which leaves the cosine and often every arg-max alone).

- **FP32 pair** (MODEL and REF both run in float32, on the CPU): ONNX Runtime and PyTorch differ by
  float rounding only, ~1e-6 of the RMS on the digits CNN (max |d| 5.7e-6, RMS 3.5); the bound
  :data:`FLOAT_TOLERANCE` = 1e-4 leaves 60x for other summation orders and sits 800x below a one-layer
  x1.02 weight change (8e-2).
- **Drift** (an engine against the outputs it gave when ``--save-reference`` ran): the engine is run
  again at every setting that may legitimately move its outputs on a re-run or rebuild -- ONNX
  Runtime's other optimisation levels, one thread, and its un-fused view (an INT8 engine's ops in
  float, where a requantization may land one quantization step apart) -- and the bound is
  :data:`DRIFT_FACTOR` x the largest deviation seen, at least :data:`DRIFT_FLOOR`.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from compress import io, quant
from compress.export.onnxruntime import INT8_OPS, Optimization, OrtEngine
from compress.export.unfuse import unfuse

FLOAT_TOLERANCE = 1e-4
DRIFT_FACTOR = 4.0
DRIFT_FLOOR = 1e-4
# Ops and element types that make an ONNX file something other than a float32 computation.
_NOT_FP32_OPS = INT8_OPS | {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
_NOT_FP32_TYPES = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def rel_error(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |outputs - reference| / rms(reference)`` (0 when both are all zero)."""
    ref = reference.double()
    rms = float(ref.square().mean().sqrt())
    err = float((outputs.double() - ref).abs().max()) if outputs.numel() else 0.0
    return err / rms if rms > 0 else (0.0 if err == 0 else float("inf"))


def is_fp32(obj: object) -> bool:
    """Whether ``obj`` (an ``.onnx`` path or engine, a module) computes in float32 on the CPU throughout: no
    Q/DQ, integer or float16 ops; a module unquantized, with float32 parameters on the CPU (on a GPU,
    cuDNN's TF32 convolutions differ by ~1e-3). Engines of other kinds and plain callables count as not known to be."""
    if isinstance(obj, nn.Module):
        params = list(obj.parameters())
        return (quant.target_of(obj) is None
                and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params))
    if isinstance(obj, OrtEngine):
        obj = obj.path
    if isinstance(obj, (str, os.PathLike)) and Path(obj).suffix == ".onnx":
        graph = onnx.load(os.fspath(obj), load_external_data=False).graph
        casts = (a.i for n in graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to")
        return (not any(n.op_type in _NOT_FP32_OPS for n in graph.node)
                and not any(t.data_type in _NOT_FP32_TYPES for t in graph.initializer)
                and not any(to in _NOT_FP32_TYPES for to in casts))
    return False


@dataclass
class DriftBound:
    """The bound for an engine against its own saved outputs, and what it was calibrated from."""

    tolerance: float
    spread: float
    variants: dict[str, float] = field(default_factory=dict)  # setting -> rel_error against the saved outputs

    def to_dict(self) -> dict[str, object]:
        return {"tolerance": self.tolerance, "spread": self.spread, "factor": DRIFT_FACTOR, "floor": DRIFT_FLOOR,
                "variants": self.variants}


def _run(engine: OrtEngine, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([engine(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])


def calibrate(model: object, inputs: torch.Tensor, outputs: torch.Tensor, batch_size: int = 64) -> DriftBound:
    """Run ONNX ``model`` at each setting a re-run may legitimately use and bound its drift from ``outputs``.

    Settings: optimisation ``disabled`` and ``extended``, ``all`` on one thread, and the un-fused view
    (:mod:`compress.export.unfuse`) with optimisation off. A model that is not an ``.onnx`` file gets
    the floor alone (its variants are not ours to choose).
    """
    if not (isinstance(model, (str, os.PathLike)) and Path(model).suffix == ".onnx"):
        return DriftBound(DRIFT_FLOOR, 0.0)
    variants: dict[str, float] = {}
    for name, level, threads in (("disabled", Optimization.disabled, None), ("extended", Optimization.extended, None),
                                 ("all, 1 thread", Optimization.all, 1)):
        variants[name] = rel_error(_run(OrtEngine(model, threads, level), inputs, batch_size), outputs)
    view, _ = unfuse(onnx.load(os.fspath(model)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "unfused.onnx"
        onnx.save(view, os.fspath(path))
        variants["un-fused view"] = rel_error(_run(OrtEngine(path, level=Optimization.disabled), inputs, batch_size),
                                              outputs)
    spread = max(variants.values())
    return DriftBound(max(DRIFT_FACTOR * spread, DRIFT_FLOOR), spread, variants)


def file_digest(path: object) -> str | None:
    """sha256 of a model file (None for an object that is not a file)."""
    if isinstance(path, (str, os.PathLike)) and Path(path).is_file():
        return io.sha256_file(path)
    return None
