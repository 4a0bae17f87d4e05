"""The typed record of one export: what each step produced, rendered as report.json's sections."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.export.options import EngineOptions
from compress.export.steps import (
    BenchResult,
    BuiltEngine,
    EngineCheck,
    ExportedOnnx,
    Fp16Onnx,
    SparsityCheck,
    TritonRepo,
    rules_failure,
)
from compress.quant.spec import Target


@dataclass(frozen=True)
class EngineRecord:
    """The built engine, scored on the eval split and timed; ``coverage``: INT8 coverage (quantized, ONNX Runtime)."""

    options: EngineOptions
    built: BuiltEngine
    source: Path  # the ONNX file it was built from
    metrics: dict[str, float]
    bench: BenchResult
    coverage: dict[str, Any] | None = None
    compared: dict[str, Any] | None = None  # steps.compare_deployed: vs the baseline's FP32 engine, or why not timed

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "backend": self.options.backend,
            "path": self.built.path.name,
            "precision": self.options.precision.value,
            "source": self.source.name,
            "metrics": self.metrics,
            "latency_ms": self.bench.p50_ms,
            "bench": self.bench.timings,
            **self.built.fields,
        }
        if self.coverage is not None:
            out.update(self.coverage)
        if self.compared is not None:
            out["vs_baseline"] = self.compared
        return out


@dataclass(frozen=True)
class ExportReport:
    """Every step's record; :meth:`to_dict` gives report.json's ``export``, ``engine`` and ``check`` sections."""

    onnx: ExportedOnnx
    target: Target
    fp16: Fp16Onnx | None
    sparsity: SparsityCheck
    engine: EngineRecord | None = None
    check: EngineCheck | None = None
    triton: TritonRepo | None = None

    @property
    def failures(self) -> list[str]:
        """What makes the exported file wrong whatever the check says: lost 2:4 weights, broken Q/DQ rules."""
        rules = self.onnx.info.rules
        found = [self.sparsity.failure, rules_failure(rules) if rules is not None else None,
                 self.fp16.failure if self.fp16 is not None else None]
        return [f for f in found if f is not None]

    @property
    def passed(self) -> bool:
        return not self.failures and (self.check is None or self.check.result.passed)

    def export_section(self) -> dict[str, Any]:
        info = self.onnx.info
        out: dict[str, Any] = {
            "onnx": self.onnx.path.name,
            "opset": info.opset,
            "target": self.target.value,
            "quantized": self.onnx.quantized,
            "qdq_pairs": info.qdq_pairs,
            "int8_weights": info.int8_weights,
            "nodes": info.nodes,
        }
        if info.int32_biases:
            out["int32_biases"] = info.int32_biases
        if info.rules is not None:
            out["tensorrt_rules"] = info.rules.to_dict()
        if self.fp16 is not None:
            out["fp16"] = self.fp16.to_dict()
        out["sparsity"] = self.sparsity.to_dict()
        out["failures"] = self.failures
        if self.triton is not None:
            out["triton"] = self.triton.to_dict()
        return out

    def to_dict(self) -> dict[str, Any]:
        """report.json's sections, keys in the order the report has always had."""
        out: dict[str, Any] = {"export": self.export_section()}
        if self.engine is not None:
            out["engine"] = self.engine.to_dict()
        if self.check is not None:
            out["check"] = self.check.to_dict()
        return out
