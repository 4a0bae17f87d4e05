"""``export``: ONNX file -> engine -> accuracy check against the PyTorch model."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator
from torch import nn

from compress import metrics, quant
from compress.config import SafeName, Strict
from compress.errors import CompressError
from compress.export import bench, tensorrt
from compress.export.check import SAMPLE_METRICS, compare
from compress.export.coverage import coverage
from compress.export.fp16 import to_fp16
from compress.export.onnx import export_onnx
from compress.export.onnxruntime import Optimization, OrtEngine, build_engine, int8_summary, portable
from compress.export.tensorrt_rules import check_tensorrt
from compress.export.trial import trial_export
from compress.export.triton import write_repository
from compress.quant.spec import Target
from compress.sparsity import PATTERN, is_sparse, sparse_layers, verify_onnx
from compress.stages.context import StageContext, StageResult
from compress.stages.order import quantized_before, shaped
from compress.stages.registry import register


class Backend(str, Enum):
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"


class OnnxOptions(Strict):
    opset: Annotated[int, Field(ge=13, le=20)] = 13
    target: Target = Target.tensorrt
    dynamic_batch: bool = True


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"  # the non-quantized parts in float16, through casts written into DIR/model.fp16.onnx


# Batch sizes the engine is built, timed and served at: a bench input of 10^9 samples would need terabytes.
MAX_BATCH = 65536
Batch = Annotated[int, Field(gt=0, le=MAX_BATCH)]


class BatchProfile(Strict):
    """TensorRT's optimization profile for the dynamic batch: tuned for ``opt``, accepts ``min..max``."""

    min: Batch = 1
    opt: Batch | None = None  # default: the largest of batch_sizes
    max: Batch | None = None  # default: the largest of batch_sizes and triton.max_batch_size


class EngineOptions(Strict):
    backend: Backend = Backend.onnxruntime
    precision: Precision = Precision.fp32
    keep_fp32: list[str] = Field(default_factory=list)  # op types or node names left in float32 by fp16
    batch_sizes: list[Batch] = Field(default_factory=lambda: [1, 8, 32])
    bench_iters: Annotated[int, Field(ge=0, le=100_000)] = 20
    # onnxruntime only
    threads: Annotated[int, Field(gt=0, le=1024)] | None = None
    # the level the engine is deployed at, so timed and checked at (ONNX Runtime's own default); the
    # engine file is saved at most at 'extended', which stays portable across CPUs
    optimization: Optimization = Optimization.all
    # tensorrt only
    profile: BatchProfile = Field(default_factory=BatchProfile)
    workspace_mb: Annotated[int, Field(gt=0)] | None = None
    timing_cache: str | None = None  # default DIR/timing.cache; point several runs at one file to share it


class CheckOptions(Strict):
    max_drop: Annotated[float, Field(ge=0)] | None = None  # points; 0.5 unless max_drop_samples is given
    max_drop_samples: Annotated[int, Field(ge=0)] | None = None  # samples lost net; top1/agreement metrics
    min_agreement: Annotated[float, Field(ge=0, le=1)] | None = None
    min_cosine: Annotated[float, Field(ge=-1, le=1)] | None = None
    reference: Literal["model", "baseline"] = "model"

    @model_validator(mode="before")
    @classmethod
    def _default_drop(cls, data: Any) -> Any:
        """``max_drop: 0.5`` unless a drop in samples is asked for: the resolved recipe shows what is applied."""
        if isinstance(data, dict) and "max_drop" not in data and data.get("max_drop_samples") is None:
            return {**data, "max_drop": 0.5}
        return data


class TritonOptions(Strict):
    name: SafeName  # the model's folder and name in the repository
    max_batch_size: Annotated[int, Field(ge=0, le=MAX_BATCH)] = 32  # 0: no batching (then the batch dim is part of dims)


class ExportConfig(Strict):
    onnx: OnnxOptions = Field(default_factory=OnnxOptions)
    engine: EngineOptions | None = Field(default_factory=EngineOptions)
    check: CheckOptions | None = Field(default_factory=CheckOptions)
    triton: TritonOptions | None = None  # also write DIR/triton/NAME (config.pbtxt + 1/model.onnx)


_ORT_ONLY, _TRT_ONLY = ("threads", "optimization"), ("profile", "workspace_mb", "timing_cache")


def _profile(engine: EngineOptions, config: ExportConfig) -> tensorrt.Profile:
    triton = config.triton.max_batch_size if config.triton is not None else 0
    top = max(engine.batch_sizes)
    return tensorrt.Profile(engine.profile.min, engine.profile.opt or top,
                            engine.profile.max or max(top, triton, engine.profile.opt or 0))


def _check_engine(model: nn.Module, config: ExportConfig, ctx: StageContext) -> None:
    engine = config.engine
    if engine is None:
        return
    where = f"{ctx.where}.engine"
    unused = _TRT_ONLY if engine.backend is Backend.onnxruntime else _ORT_ONLY
    for key in unused:
        if key in engine.model_fields_set:
            raise CompressError(f"{where}.{key}: applies to backend {'tensorrt' if key in _TRT_ONLY else 'onnxruntime'}, "
                                f"not {engine.backend.value}")
    if engine.keep_fp32 and engine.precision is not Precision.fp16:
        raise CompressError(f"{where}.keep_fp32: only means something with precision: fp16")
    if engine.precision is Precision.fp16 and config.onnx.opset < 19 and quantized_before(model, ctx):
        raise CompressError(f"{where}.precision: fp16 on a quantized model needs onnx.opset >= 19, where "
                            "QuantizeLinear/DequantizeLinear take float16 scales; set onnx.opset: 19")
    if (engine.backend is Backend.onnxruntime and engine.precision is Precision.fp16
            and engine.optimization is not Optimization.disabled and quantized_before(model, ctx)):
        raise CompressError(f"{where}.optimization: ONNX Runtime's CPU graph optimizations miscompute float16 Q/DQ "
                            "graphs (measured: resnet18 top1 94.7 -> 87.2); set optimization: disabled, or keep "
                            "precision: fp32 for onnxruntime (float16 + INT8 is for backend tensorrt)")
    if (engine.backend is Backend.onnxruntime and engine.precision is Precision.fp16 and config.triton is not None
            and quantized_before(model, ctx)):
        raise CompressError(f"{ctx.where}.triton: Triton's ONNX Runtime backend would serve the float16 Q/DQ graph with "
                            "graph optimizations on, which miscompute it; drop triton or use precision: fp32")
    if engine.backend is Backend.tensorrt:
        reason = tensorrt.why_unavailable()
        if reason is not None:
            raise CompressError(f"{where}.backend: tensorrt cannot run here: {reason}; use backend: onnxruntime")
        if config.onnx.dynamic_batch:
            try:
                profile = _profile(engine, config)
            except CompressError as exc:
                raise CompressError(f"{where}.profile: {str(exc).removeprefix('tensorrt profile: ')}") from None
            outside = [b for b in engine.batch_sizes if not profile.min <= b <= profile.max]
            if outside:
                raise CompressError(f"{where}.batch_sizes: {outside} outside the profile's {profile.min}..{profile.max}")
            if config.triton is not None and config.triton.max_batch_size > profile.max:
                raise CompressError(f"{ctx.where}.triton.max_batch_size: {config.triton.max_batch_size} is above the "
                                    f"engine profile's max batch {profile.max}; raise engine.profile.max")
        elif "profile" in engine.model_fields_set:
            raise CompressError(f"{where}.profile: the ONNX has a fixed batch (onnx.dynamic_batch: false)")


def _check(model: nn.Module, config: ExportConfig, ctx: StageContext) -> None:
    _check_engine(model, config, ctx)
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
    if config.check is not None and config.check.max_drop_samples is not None and ctx.metric not in SAMPLE_METRICS:
        raise CompressError(f"{ctx.where}.check.max_drop_samples: counts samples, so it needs metric "
                            f"{' or '.join(SAMPLE_METRICS)}, not {ctx.metric}; use max_drop (points)")


def _validate(model: nn.Module, config: ExportConfig, ctx: StageContext) -> None:
    """``compress validate`` (and ``run`` before any stage trains): the options, then a trial export."""
    _check(model, config, ctx)
    trial_export(*shaped(model, ctx), ctx.example_input, config.onnx.opset, config.onnx.target,
                 config.onnx.dynamic_batch, ctx.where)


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


def _fp16(onnx_path: Path, engine: EngineOptions, report: dict[str, Any], failures: list[str], rules: bool) -> Path:
    """Write DIR/model.fp16.onnx (float16 with casts) and note what the conversion did."""
    import onnx

    from compress import io

    path = onnx_path.with_name("model.fp16.onnx")
    converted, info = to_fp16(onnx.load(str(onnx_path)), keep_fp32=engine.keep_fp32)
    with io.atomic_path(path) as tmp:
        onnx.save(converted, str(tmp))
    report["fp16"] = {"onnx": path.name, **info.to_dict()}
    if rules:  # the file TensorRT builds from must follow the Q/DQ rules too
        check = check_tensorrt(converted)
        report["fp16"]["tensorrt_rules"] = check.to_dict()
        if not check.passed:
            failures.append(f"{len(check.violations)} TensorRT Q/DQ rule violation(s) in {path.name}, first: "
                            f"{check.violations[0] if check.violations else '?'}")
    return path


SIMULATED_INT8 = ("the Q/DQ graph runs in ONNX Runtime, which simulates INT8 in float: its accuracy is valid, "
                  "its latency is not that of INT8 kernels{}")


def _build(source: Path, engine: EngineOptions, config: ExportConfig, sparse_weights: bool, ctx: StageContext
           ) -> tuple[Any, Path, dict[str, Any]]:
    """The engine (a callable on tensors), its file, and backend-specific report fields."""
    if engine.backend is Backend.tensorrt:
        cache = Path(engine.timing_cache) if engine.timing_cache else ctx.run_dir / "timing.cache"
        runner, info = tensorrt.build_engine(
            source, ctx.run_dir / "engine.plan", profile=_profile(engine, config) if config.onnx.dynamic_batch else None,
            workspace_mb=engine.workspace_mb, sparse_weights=sparse_weights, timing_cache=cache,
            layers_json=ctx.run_dir / "engine.layers.json",
        )
        return runner, ctx.run_dir / "engine.plan", {"tensorrt": info.to_dict()}
    path = ctx.run_dir / "engine.onnx"
    saved = portable(engine.optimization)
    built = build_engine(source, path, threads=engine.threads, level=saved)
    # timed and checked as deployed: the saved file in a session at the deployed level
    runner = built if saved is engine.optimization else OrtEngine(path, engine.threads, engine.optimization)
    levels = {"file": saved.value, "timed": engine.optimization.value if engine.bench_iters else None,
              "checked": engine.optimization.value}
    return runner, path, {"optimization": levels, **int8_summary(path)}


def _int8_coverage(model: nn.Module, source: Path, engine_path: Path, engine: EngineOptions, target: Target
                   ) -> dict[str, Any]:
    """For a quantized model in ONNX Runtime: the weighted ops left in float with their reasons, the INT8
    share of MACs, and whether the engine really runs INT8 kernels or simulates them in float."""
    fuses = engine.optimization is not Optimization.disabled
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


@register("export", ExportConfig, check=_validate, changes_model=False,
          deploy_target=lambda config: (config.onnx.target, ("onnx", "target")))
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
    failures: list[str] = []
    if info.int32_biases:
        report["export"]["int32_biases"] = info.int32_biases
    if info.rules is not None:
        report["export"]["tensorrt_rules"] = info.rules.to_dict()
        if not info.rules.passed:
            failures.append(f"{len(info.rules.violations)} TensorRT Q/DQ rule violation(s), first: "
                            f"{info.rules.violations[0] if info.rules.violations else '?'}")
    engine = config.engine
    source = onnx_path  # what the engine (and Triton) is built from
    if engine is not None and engine.precision is Precision.fp16:
        try:
            source = _fp16(onnx_path, engine, report["export"], failures, rules=info.rules is not None)
        except CompressError as exc:
            raise CompressError(f"{ctx.where}.engine.precision: {exc}") from None
    sparse = _sparsity(model, source)
    report["export"]["sparsity"] = sparse
    if sparse.get("missing"):  # the model's masks did not survive into the file: engines would run it dense
        failures.insert(0, f"the exported weights of {', '.join(sparse['missing'])} are not 2:4")
    report["export"]["failures"] = failures
    passed = not failures
    engine_path = None
    if engine is not None:
        runner, engine_path, extra = _build(source, engine, config, bool(sparse["sparse_weights"]), ctx)
        runners, names = [runner], [f"engine {engine_path}"]
        if quantized:  # the ONNX as written (Q/DQ as float ops) must agree with the fake-quant model too
            runners.append(OrtEngine(onnx_path, engine.threads, Optimization.disabled, spinning=False))
            names.append(f"onnx {onnx_path}")
        outs = metrics.collect_many(runners, ctx.splits.loader("eval"), names=names)
        engine_out = outs[0]
        timings = bench.latency(runner, ctx.example_input, engine.batch_sizes, iters=engine.bench_iters) if engine.bench_iters else {}
        report["engine"] = {
            "backend": engine.backend.value,
            "path": engine_path.name,
            "precision": engine.precision.value,
            "source": source.name,
            "metrics": metrics.score(ctx.metric, engine_out, ctx.baseline_outputs),
            "latency_ms": {bs: t["p50_ms"] for bs, t in timings.items()},
            "bench": timings,
            **extra,
        }
        if quantized and engine.backend is Backend.onnxruntime:
            report["engine"].update(_int8_coverage(model, source, engine_path, engine, config.onnx.target))
        if config.check is not None:
            model_out = ctx.input_model_outputs(model)  # one eval pass: reference and onnx_vs_model share it
            reference = ctx.baseline_outputs if config.check.reference == "baseline" else model_out
            result = compare(
                engine_out,
                reference,
                metric=ctx.metric,
                max_drop=config.check.max_drop,
                max_drop_samples=config.check.max_drop_samples,
                min_agreement=config.check.min_agreement,
                min_cosine=config.check.min_cosine,
            )
            report["check"] = {"reference": config.check.reference, **result.to_dict()}
            if quantized:
                report["check"]["onnx_vs_model"] = metrics.fidelity(outs[1].logits, model_out.logits)
                report["check"]["engine_vs_onnx"] = metrics.fidelity(engine_out.logits, outs[1].logits)
            passed = passed and result.passed
    if config.triton is not None:
        backend = engine.backend.value if engine is not None else "onnxruntime"
        model_file = engine_path if backend == "tensorrt" and engine_path is not None else source
        folder = write_repository(ctx.run_dir / "triton", model_file, source, name=config.triton.name,
                                  max_batch_size=config.triton.max_batch_size, backend=backend)
        report["export"]["triton"] = {"repository": "triton", "model": config.triton.name, "platform": backend,
                                      "files": [str(p.relative_to(ctx.run_dir)) for p in sorted(folder.rglob("*"))
                                                if p.is_file()],
                                      "max_batch_size": config.triton.max_batch_size}
    return StageResult(model, report=report, passed=passed)
