"""ONNX Runtime engine backend: the engine file is ORT's optimised model, run on the CPU provider."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress import io
from compress.errors import CompressError, first_line
from compress.optimization_level import Optimization
from compress.outputs import SINGLE

_ORDER = list(Optimization)


def portable(level: Optimization) -> Optimization:
    """The level an engine file is saved at for a session run at ``level``: at most ``extended``, since
    ONNX Runtime documents that a model saved after ``all`` carries layout transforms tied to the machine."""
    return min(level, Optimization.extended, key=_ORDER.index)


def session_options(threads: int | None, level: Optimization, spinning: bool = True):  # noqa: ANN202 - ort type
    import onnxruntime as ort

    levels = {
        Optimization.disabled: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        Optimization.basic: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        Optimization.extended: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        Optimization.all: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[level]
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if not spinning:  # idle sessions' spinning threads would take the cores from the one being timed
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
                "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


def session_feeds(session: Any, x: Any, label: str) -> dict[str, np.ndarray]:
    """Feeds for an ONNX Runtime ``session`` from one array/tensor, a tuple of them (positional) or a dict (by
    input name), each cast to the dtype its graph input declares (token ids stay int64).

    Raises:
        CompressError: the inputs do not match the graph's (count or names), naming ``label``.
    """
    types = {i.name: _NUMPY_TYPES.get(i.type, np.float32) for i in session.get_inputs()}
    if isinstance(x, dict):
        if set(x) != set(types):
            raise CompressError(f"{label}: takes inputs {sorted(types)}, given {sorted(x)}")
        pairs = list(x.items())
    else:
        items = list(x) if isinstance(x, (tuple, list)) else [x]
        if len(items) != len(types):
            raise CompressError(f"{label}: takes {len(types)} input(s) {list(types)}, given {len(items)}")
        pairs = list(zip(types, items, strict=True))
    return {name: np.ascontiguousarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v,
                                       dtype=types[name]) for name, v in pairs}


class OrtEngine:
    """An ONNX (or engine) file in an ONNX Runtime CPU session, callable on torch tensors.

    Args:
        level: the graph optimisation the session applies on load (default ``all``, ONNX Runtime's own).
        spinning: let idle intra-op threads spin (ONNX Runtime's default); turn it off for sessions
            timed side by side, whose spinning threads would otherwise take the cores.
    """

    def __init__(
        self, path: str | os.PathLike[str], threads: int | None = None, level: Optimization = Optimization.all,
        spinning: bool = True,
    ) -> None:
        import onnxruntime as ort

        self.path, self.level, self.spinning = Path(path), level, spinning
        if not self.path.is_file():
            raise CompressError(f"engine {self.path}: file not found")
        try:
            self.session = ort.InferenceSession(
                str(self.path), session_options(threads, level, spinning), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own exception types for corrupt models
            raise CompressError(f"engine {self.path}: ONNX Runtime cannot load it: {first_line(exc)}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def feeds(self, x: Any) -> dict[str, np.ndarray]:
        """Session feeds from one array/tensor, a tuple of them (positional) or a dict (by input name), each
        cast to the dtype its graph input declares (token ids stay int64).

        Raises:
            CompressError: the inputs do not match the graph's (count or names).
        """
        return session_feeds(self.session, x, f"engine {self.path}")

    def run(self, x: Any) -> np.ndarray:
        """The first output (the only one of single-output models; :meth:`run_all` has every one)."""
        return self.run_all(x)[0]

    def run_all(self, x: Any) -> list[np.ndarray]:
        return list(self.session.run(None, self.feeds(x)))

    def __call__(self, x: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        """One tensor for a graph with the one output ``output``; else ``{output name: tensor}``, the names
        the export gave the model's outputs (:mod:`compress.outputs`), so they pair with the model's.
        ``x``: model inputs as :mod:`compress.inputs` has them (a tensor, a tuple or a dict of tensors)."""
        arrays = self.run_all(x)
        if self.output_names == [SINGLE]:
            return torch.from_numpy(arrays[0])
        return {name: torch.from_numpy(a) for name, a in zip(self.output_names, arrays, strict=True)}


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    *,
    threads: int | None = None,
    level: Optimization = Optimization.extended,
) -> OrtEngine:
    """Optimise ``onnx_path`` at ``level``, save the optimised graph atomically as ``engine_path``, and
    return it in a session at the same level (open it at another level with :class:`OrtEngine`)."""
    import onnxruntime as ort

    so = session_options(threads, level)
    with io.atomic_path(engine_path) as tmp:
        so.optimized_model_filepath = str(tmp)
        try:
            ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise CompressError(f"ONNX Runtime cannot build {onnx_path}: {first_line(exc)}") from None
    return OrtEngine(engine_path, threads, level)


# Ops ONNX Runtime runs on integers after fusing Q/DQ groups (com.microsoft and ONNX domains).
INT8_OPS = frozenset({
    "QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearReduceMean",
})
INT8_WEIGHTED = frozenset({"QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger",
                            "MatMulIntegerToFloat", "DynamicQuantizeMatMul"})
FLOAT_WEIGHTED = frozenset({"Conv", "FusedConv", "NchwcConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul",
                             "FusedMatMul"})


def int8_summary(path: str | os.PathLike[str]) -> dict[str, object]:
    """How much of an optimised ONNX Runtime graph runs in INT8.

    Returns:
        ``int8_ops`` (op type -> count), ``float_weighted_ops`` (Conv/Gemm/MatMul left in float), and
        ``int8_weighted_fraction`` (INT8 share of the weighted ops).
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    int8 = {k: v for k, v in sorted(counts.items()) if k in INT8_OPS}
    flt = {k: v for k, v in sorted(counts.items()) if k in FLOAT_WEIGHTED}
    n_int8 = sum(v for k, v in int8.items() if k in INT8_WEIGHTED)
    total = n_int8 + sum(flt.values())
    return {
        "int8_ops": int8,
        "float_weighted_ops": flt,
        "int8_weighted_fraction": round(n_int8 / total, 4) if total else 0.0,
    }
