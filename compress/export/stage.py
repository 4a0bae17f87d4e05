"""``export``: ONNX file -> engine -> accuracy check against the PyTorch model."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field
from torch import nn

from compress import metrics, quant
from compress.errors import CompressError
from compress.export import bench
from compress.export.check import compare
from compress.export.onnx import export_onnx
from compress.export.onnxruntime import Optimization, OrtEngine, build_engine, int8_summary
from compress.export.triton import write_repository
from compress.quant.spec import Target
from compress.recipe import Strict
from compress.sparsity import PATTERN, is_sparse, sparse_layers, verify_onnx
from compress.stages.context import StageContext, StageResult
from compress.stages.registry import register


class Backend(str, Enum):
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"


class OnnxOptions(Strict):
    opset: Annotated[int, Field(ge=13, le=20)] = 13
    target: Target = Target.tensorrt
    dynamic_batch: bool = True


class EngineOptions(Strict):
    backend: Backend = Backend.onnxruntime
    threads: Annotated[int, Field(gt=0)] | None = None
    optimization: Optimization = Optimization.extended
    batch_sizes: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [1, 8, 32])
    bench_iters: Annotated[int, Field(ge=0)] = 20


class CheckOptions(Strict):
    max_drop: Annotated[float, Field(ge=0)] | None = 0.5
    min_agreement: Annotated[float, Field(ge=0, le=1)] | None = None
    min_cosine: Annotated[float, Field(ge=-1, le=1)] | None = None
    reference: Literal["model", "baseline"] = "model"


class TritonOptions(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]  # the model's folder and name in the repository
    max_batch_size: Annotated[int, Field(ge=0)] = 32  # 0: no batching (then the batch dim is part of dims)


class ExportConfig(Strict):
    onnx: OnnxOptions = Field(default_factory=OnnxOptions)
    engine: EngineOptions | None = Field(default_factory=EngineOptions)
    check: CheckOptions | None = Field(default_factory=CheckOptions)
    triton: TritonOptions | None = None  # also write DIR/triton/NAME (config.pbtxt + 1/model.onnx)


def _check(model: nn.Module, config: ExportConfig, ctx: StageContext) -> None:
    if config.engine is not None and config.engine.backend is Backend.tensorrt:
        raise CompressError(
            f"{ctx.where}.engine.backend: tensorrt needs the TensorRT backend, which this version of compress "
            "does not include yet; use backend: onnxruntime"
        )
    own = quant.target_of(model)  # no stage changes a quantized model's target, so this holds for the run
    if own is not None and own is not config.onnx.target:
        raise CompressError(
            f"{ctx.where}.onnx.target: is {config.onnx.target.value} but the model was quantized for {own.value}; "
            f"set target: {own.value}"
        )
    if config.triton is not None and config.triton.max_batch_size > 0 and not config.onnx.dynamic_batch:
        raise CompressError(f"{ctx.where}.triton.max_batch_size: Triton batches along a dynamic batch dimension; "
                            "set onnx.dynamic_batch: true or max_batch_size: 0")
    if config.check is not None and config.engine is None:
        raise CompressError(f"{ctx.where}.check: needs an engine to check; add an engine block or set check: null")


def _sparsity(model: nn.Module, onnx_path: Path) -> dict[str, Any]:
    """The 2:4 check of the written ONNX (weights after dequantization), against the model's own masks."""
    check = verify_onnx(onnx_path)
    summary: dict[str, Any] = {"pattern": PATTERN, "sparse_weights": bool(check.sparse_layers),
                               "sparse_layers": check.sparse_layers}
    if is_sparse(model):
        summary["expected"] = sparse_layers(model)
        summary["missing"] = check.missing(summary["expected"])
    if check.sparse_layers or is_sparse(model):  # per-layer detail only where 2:4 is in play
        summary["layers"] = {name: c.to_dict() for name, c in check.layers.items()}
    return summary


@register("export", ExportConfig, check=_check, changes_model=False)
def run_export(model: nn.Module, config: ExportConfig, ctx: StageContext) -> StageResult:
    _check(model, config, ctx)
    onnx_path = ctx.run_dir / "model.onnx"
    quantized = quant.is_quantized(model)
    try:
        info = export_onnx(
            model, ctx.example_input, onnx_path, opset=config.onnx.opset, dynamic_batch=config.onnx.dynamic_batch,
            target=config.onnx.target,
        )
    except CompressError as exc:
        raise CompressError(f"{ctx.where}: {exc}") from None
    report: dict = {
        "export": {
            "onnx": onnx_path.name,
            "opset": info.opset,
            "target": config.onnx.target.value,
            "quantized": quantized,
            "qdq_pairs": info.qdq_pairs,
            "int8_weights": info.int8_weights,
            "nodes": info.nodes,
        }
    }
    failures = []
    sparse = _sparsity(model, onnx_path)
    report["export"]["sparsity"] = sparse
    if sparse.get("missing"):  # the model's masks did not survive into the file: engines would run it dense
        failures.append(f"the exported weights of {', '.join(sparse['missing'])} are not 2:4")
    if info.int32_biases:
        report["export"]["int32_biases"] = info.int32_biases
    if info.rules is not None:
        report["export"]["tensorrt_rules"] = info.rules.to_dict()
        if not info.rules.passed:
            failures.append(f"{len(info.rules.violations)} TensorRT Q/DQ rule violation(s), first: "
                            f"{info.rules.violations[0] if info.rules.violations else '?'}")
    if config.triton is not None:
        folder = write_repository(ctx.run_dir / "triton", onnx_path, onnx_path, name=config.triton.name,
                                  max_batch_size=config.triton.max_batch_size)
        report["export"]["triton"] = {"repository": "triton", "model": config.triton.name,
                                      "files": [str(p.relative_to(ctx.run_dir)) for p in sorted(folder.rglob("*"))
                                                if p.is_file()],
                                      "max_batch_size": config.triton.max_batch_size}
    report["export"]["failures"] = failures
    passed = not failures
    if config.engine is not None:
        engine_path = ctx.run_dir / "engine.onnx"
        engine = build_engine(onnx_path, engine_path, threads=config.engine.threads, level=config.engine.optimization)
        runners, names = [engine], [f"engine {engine_path}"]
        if quantized:  # the ONNX as written (Q/DQ as float ops) must agree with the fake-quant model too
            runners.append(OrtEngine(onnx_path, config.engine.threads, Optimization.disabled))
            names.append(f"onnx {onnx_path}")
        outs = metrics.collect_many(runners, ctx.splits.loader("eval"), names=names)
        engine_out = outs[0]
        timings = bench.latency(engine, ctx.example_input, config.engine.batch_sizes, iters=config.engine.bench_iters) if config.engine.bench_iters else {}
        report["engine"] = {
            "backend": config.engine.backend.value,
            "path": engine_path.name,
            "metrics": metrics.score(ctx.metric, engine_out, ctx.baseline_outputs),
            "latency_ms": {bs: t["p50_ms"] for bs, t in timings.items()},
            "bench": timings,
            **int8_summary(engine_path),
        }
        if config.check is not None:
            model_out = ctx.input_model_outputs(model)  # one eval pass: reference and onnx_vs_model share it
            reference = ctx.baseline_outputs if config.check.reference == "baseline" else model_out
            result = compare(
                engine_out,
                reference,
                metric=ctx.metric,
                max_drop=config.check.max_drop,
                min_agreement=config.check.min_agreement,
                min_cosine=config.check.min_cosine,
            )
            report["check"] = {"reference": config.check.reference, **result.to_dict()}
            if quantized:
                report["check"]["onnx_vs_model"] = metrics.fidelity(outs[1].logits, model_out.logits)
                report["check"]["engine_vs_onnx"] = metrics.fidelity(engine_out.logits, outs[1].logits)
            passed = passed and result.passed
    return StageResult(model, report=report, passed=passed)
