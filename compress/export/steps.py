"""The export's steps, one function each, each returning a small typed record.

ONNX export -> float16 copy (optional) -> 2:4 verification -> engine build -> evaluation -> bench ->
INT8 coverage (ONNX Runtime) -> accuracy check -> Triton repository. :mod:`compress.export.stage`
runs them in that order; :class:`compress.export.outcome.ExportReport` gathers their records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from compress import io, metrics
from compress.errors import first_line
from compress.export import bench, latency, tensorrt
from compress.export.check import CheckResult, Runner, compare
from compress.export.coverage import coverage
from compress.export.fp16 import Fp16Info, to_fp16
from compress.export.onnx import OnnxInfo, export_onnx
from compress.export.onnxruntime import Optimization, OrtEngine, int8_summary, portable
from compress.export.onnxruntime import build_engine as build_ort
from compress.export.options import CheckOptions, EngineOptions, OnnxOptions, TensorRTEngine, TritonOptions
from compress.export.tensorrt_rules import RulesReport, check_tensorrt
from compress.export.triton import write_repository
from compress.quant.spec import Target
from compress.sparsity import PATTERN, is_sparse, sparse_layers, verify_onnx


def rules_failure(rules: RulesReport, file: str = "") -> str | None:
    """The failure line for TensorRT Q/DQ rule violations (None when the rules hold)."""
    if rules.passed:
        return None
    return (f"{len(rules.violations)} TensorRT Q/DQ rule violation(s){f' in {file}' if file else ''}, first: "
            f"{rules.violations[0] if rules.violations else '?'}")


@dataclass(frozen=True)
class ExportedOnnx:
    """DIR/model.onnx as written, and whether the model exported was quantized."""

    info: OnnxInfo
    quantized: bool

    @property
    def path(self) -> Path:
        return Path(self.info.path)


def export_model(model: nn.Module, example_input: torch.Tensor, path: Path, options: OnnxOptions,
                 quantized: bool) -> ExportedOnnx:
    """Export ``model`` to ``path`` (see :func:`compress.export.onnx.export_onnx`)."""
    info = export_onnx(model, example_input, path, opset=options.opset, dynamic_batch=options.dynamic_batch,
                       target=options.target)
    return ExportedOnnx(info=info, quantized=quantized)


@dataclass(frozen=True)
class Fp16Onnx:
    """DIR/model.fp16.onnx: float16 with casts, and (target tensorrt) its Q/DQ rules check."""

    path: Path
    info: Fp16Info
    rules: RulesReport | None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"onnx": self.path.name, **self.info.to_dict()}
        if self.rules is not None:
            out["tensorrt_rules"] = self.rules.to_dict()
        return out

    @property
    def failure(self) -> str | None:
        return rules_failure(self.rules, self.path.name) if self.rules is not None else None


def write_fp16(onnx_path: Path, keep_fp32: list[str], rules: bool) -> Fp16Onnx:
    """Write DIR/model.fp16.onnx next to ``onnx_path``; ``rules``: check it against TensorRT's Q/DQ rules too
    (the file TensorRT builds from must follow them)."""
    path = onnx_path.with_name("model.fp16.onnx")
    converted, info = to_fp16(onnx.load(str(onnx_path)), keep_fp32=keep_fp32)
    with io.atomic_path(path) as tmp:
        onnx.save(converted, str(tmp))
    return Fp16Onnx(path=path, info=info, rules=check_tensorrt(converted) if rules else None)


@dataclass(frozen=True)
class SparsityCheck:
    """The 2:4 check of the written ONNX (weights after dequantization), against the model's own masks.

    ``expected``/``missing`` only for a model with masks; ``layers`` only where 2:4 is in play.
    """

    sparse_layers: list[str]
    expected: list[str] | None = None
    missing: list[str] | None = None
    layers: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pattern": PATTERN, "sparse_weights": bool(self.sparse_layers),
                               "sparse_layers": self.sparse_layers}
        if self.expected is not None:
            out["expected"], out["missing"] = self.expected, self.missing
        if self.layers is not None:
            out["layers"] = self.layers
        return out

    @property
    def failure(self) -> str | None:
        """The model's masks did not survive into the file: engines would run it dense."""
        return f"the exported weights of {', '.join(self.missing)} are not 2:4" if self.missing else None


def verify_sparsity(model: nn.Module, onnx_path: Path) -> SparsityCheck:
    """Which weights of ``onnx_path`` are 2:4, and which of the model's masked layers are not."""
    check = verify_onnx(onnx_path)
    masked = is_sparse(model)
    expected = sparse_layers(model) if masked else None
    return SparsityCheck(
        sparse_layers=check.sparse_layers,
        expected=expected,
        missing=check.missing(expected) if expected is not None else None,
        layers={name: c.to_dict() for name, c in check.layers.items()} if check.sparse_layers or masked else None,
    )


def trt_profile(engine: TensorRTEngine, triton: TritonOptions | None) -> tensorrt.Profile:
    """The TensorRT profile: the options' values, defaults from the batch sizes and Triton's max batch."""
    top = max(engine.batch_sizes)
    served = triton.max_batch_size if triton is not None else 0
    return tensorrt.Profile(engine.profile.min, engine.profile.opt or top,
                            engine.profile.max or max(top, served, engine.profile.opt or 0))


@dataclass(frozen=True)
class BuiltEngine:
    """The engine (a callable on tensors), its file, and the backend's own report fields."""

    runner: Runner  # OrtEngine or TrtEngine
    path: Path
    fields: dict[str, Any]


def build_engine(source: Path, engine: EngineOptions, run_dir: Path, *, dynamic_batch: bool,
                 triton: TritonOptions | None, sparse_weights: bool) -> BuiltEngine:
    """Build DIR/engine.plan (TensorRT) or DIR/engine.onnx (ONNX Runtime) from ``source``."""
    if isinstance(engine, TensorRTEngine):
        path = run_dir / "engine.plan"
        cache = Path(engine.timing_cache) if engine.timing_cache else run_dir / "timing.cache"
        plan, info = tensorrt.build_engine(
            source, path, profile=trt_profile(engine, triton) if dynamic_batch else None,
            workspace_mb=engine.workspace_mb, sparse_weights=sparse_weights, timing_cache=cache,
            layers_json=run_dir / "engine.layers.json",
        )
        return BuiltEngine(plan, path, {"tensorrt": info.to_dict()})
    path = run_dir / "engine.onnx"
    saved = portable(engine.optimization)
    built = build_ort(source, path, threads=engine.threads, level=saved)
    # timed and checked as deployed: the saved file in a session at the deployed level
    runner: OrtEngine = built if saved is engine.optimization else OrtEngine(path, engine.threads, engine.optimization)
    levels = {"file": saved.value, "timed": engine.optimization.value if engine.bench_iters else None,
              "checked": engine.optimization.value}
    return BuiltEngine(runner, path, {"optimization": levels, **int8_summary(path)})


@dataclass(frozen=True)
class Evaluation:
    """The engine's outputs on the eval split and, for a quantized model, the written ONNX's (Q/DQ as
    float ops), which must agree with the fake-quant model too."""

    engine: metrics.Outputs
    onnx: metrics.Outputs | None


def evaluate(built: BuiltEngine, exported: ExportedOnnx, threads: int | None, loader: Any,
             output: str | None = None) -> Evaluation:
    """Run the engine (and, quantized, the ONNX as written) over ``loader`` in one pass; ``output`` names the
    task output of a model with several (see :func:`compress.metrics.collect_many`)."""
    runners, names = [built.runner], [f"engine {built.path}"]
    if exported.quantized:
        runners.append(OrtEngine(exported.path, threads, Optimization.disabled, spinning=False))
        names.append(f"onnx {exported.path}")
    outs = metrics.collect_many(runners, loader, names=names, output=output)
    return Evaluation(engine=outs[0], onnx=outs[1] if exported.quantized else None)


@dataclass(frozen=True)
class BenchResult:
    """Latency per batch size (``bench.latency``'s figures); empty when ``bench_iters`` is 0."""

    timings: dict[str, dict[str, float]] = field(default_factory=dict)  # by batch size, as text (JSON keys)

    @property
    def p50_ms(self) -> dict[str, float]:
        return {bs: t["p50_ms"] for bs, t in self.timings.items()}


def bench_engine(built: BuiltEngine, example_input: torch.Tensor, batch_sizes: list[int], iters: int) -> BenchResult:
    """Time the engine at each batch size after warm-up (nothing when ``iters`` is 0)."""
    return BenchResult(bench.latency(built.runner, example_input, batch_sizes, iters=iters) if iters else {})


def compare_deployed(baseline: nn.Module, model: nn.Module, engine: Path, example: Any, batch_sizes: list[int],
                     workdir: Path, *, quantized: bool, iters: int, threads: int | None) -> dict[str, Any]:
    """The engine timed against the baseline's FP32 engine (and the compressed structure in FP32) at the middle
    batch size (8 in the default 1, 8, 32): report.json's ``engine.vs_baseline`` and the plot's latency axis.
    Advice, like pruning's latency check: a failure to export or time the baseline is said, not raised."""
    batch_size = sorted(batch_sizes)[len(batch_sizes) // 2]
    try:
        return latency.compare_deployed(baseline, model, engine, example, batch_size, workdir, quantized=quantized,
                                        iters=iters, threads=threads).to_report()
    except Exception as exc:  # export and ORT raise many types; none of them should fail the export
        return {"batch_size": batch_size, "not_timed": f"the baseline's FP32 engine could not be timed "
                                                       f"({first_line(exc)})"}


SIMULATED_INT8 = ("the Q/DQ graph runs in ONNX Runtime, which simulates INT8 in float: its accuracy is valid, "
                  "its latency is not that of INT8 kernels{}")


def int8_coverage(model: nn.Module, source: Path, engine_path: Path, optimization: Optimization, target: Target
                  ) -> dict[str, Any]:
    """For a quantized model in ONNX Runtime: the weighted ops left in float with their reasons, the INT8
    share of MACs, and whether the engine really runs INT8 kernels or simulates them in float."""
    fuses = optimization is not Optimization.disabled
    info: dict[str, Any] = coverage(source, engine_path, model, fuses=fuses).to_dict()
    if target is Target.tensorrt:
        info["int8_execution"] = "simulated"
        info["int8_note"] = SIMULATED_INT8.format(" (nor TensorRT's); build with engine.backend: tensorrt for that")
    elif not fuses:
        info["int8_execution"] = "simulated"
        info["int8_note"] = SIMULATED_INT8.format(" (optimization: disabled fuses no Q/DQ group)")
    else:
        info["int8_execution"] = "kernels"
    return info


@dataclass(frozen=True)
class EngineCheck:
    """The engine against its reference, and (quantized) the fidelity of each hop: model -> ONNX -> engine."""

    reference: str
    result: CheckResult
    onnx_vs_model: dict[str, float] | None = None
    engine_vs_onnx: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"reference": self.reference, **self.result.to_dict()}
        if self.onnx_vs_model is not None:
            out["onnx_vs_model"] = self.onnx_vs_model
        if self.engine_vs_onnx is not None:
            out["engine_vs_onnx"] = self.engine_vs_onnx
        return out


def check_engine(evaluation: Evaluation, model_out: metrics.Outputs, baseline_out: metrics.Outputs,
                 options: CheckOptions, metric: str) -> EngineCheck:
    """Compare the engine's outputs with the model's (or the baseline's) at the options' thresholds."""
    reference = baseline_out if options.reference == "baseline" else model_out
    result = compare(evaluation.engine, reference, metric=metric, max_drop=options.max_drop,
                     max_drop_samples=options.max_drop_samples, min_agreement=options.min_agreement,
                     min_cosine=options.min_cosine)
    onnx = evaluation.onnx
    return EngineCheck(
        reference=options.reference, result=result,
        onnx_vs_model=metrics.task_fidelity(onnx, model_out) if onnx is not None else None,
        engine_vs_onnx=metrics.task_fidelity(evaluation.engine, onnx) if onnx is not None else None,
    )


@dataclass(frozen=True)
class TritonRepo:
    """DIR/triton/NAME: config.pbtxt and the model file (``files`` relative to the run directory)."""

    options: TritonOptions
    platform: str
    files: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"repository": "triton", "model": self.options.name, "platform": self.platform, "files": self.files,
                "max_batch_size": self.options.max_batch_size}


def write_triton(options: TritonOptions, run_dir: Path, source: Path, built: BuiltEngine | None,
                 engine: EngineOptions | None) -> TritonRepo:
    """Write the Triton model repository: the TensorRT plan, or the ONNX the engine was built from."""
    platform = engine.backend if engine is not None else "onnxruntime"
    model_file = built.path if platform == "tensorrt" and built is not None else source
    folder = write_repository(run_dir / "triton", model_file, source, name=options.name,
                              max_batch_size=options.max_batch_size, backend=platform)
    files = [str(p.relative_to(run_dir)) for p in sorted(folder.rglob("*")) if p.is_file()]
    return TritonRepo(options=options, platform=platform, files=files)
