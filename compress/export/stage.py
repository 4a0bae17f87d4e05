"""``export``: ONNX file -> engine -> accuracy check against the PyTorch model.

The steps live in :mod:`compress.export.steps` (one function and one record each); this module is the
recipe's ``export`` section, its up-front checks, and the order the steps run in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn

from compress import metrics, quant
from compress.config import Strict
from compress.errors import CompressError
from compress.export import steps, tensorrt
from compress.export.check import SAMPLE_METRICS
from compress.export.onnxruntime import Optimization
from compress.export.options import MAX_BATCH as MAX_BATCH  # the CLI's bench bound, imported from here
from compress.export.options import (
    CheckOptions,
    EngineOptions,
    OnnxOptions,
    OnnxRuntimeEngine,
    Precision,
    TensorRTEngine,
    TritonOptions,
)
from compress.export.outcome import EngineRecord, ExportReport
from compress.export.trial import trial_export
from compress.stages.context import StageContext, StageResult
from compress.stages.order import quantized_before, shaped
from compress.stages.registry import register
from compress.train import is_main_process


class ExportConfig(Strict):
    onnx: OnnxOptions = Field(default_factory=OnnxOptions)
    engine: EngineOptions | None = Field(default_factory=OnnxRuntimeEngine)
    check: CheckOptions | None = Field(default_factory=CheckOptions)
    triton: TritonOptions | None = None  # also write DIR/triton/NAME (config.pbtxt + 1/model.onnx)


def _check_engine(model: nn.Module, config: ExportConfig, ctx: StageContext) -> None:
    engine = config.engine
    if engine is None:
        return
    where = f"{ctx.where}.engine"
    if engine.keep_fp32 and engine.precision is not Precision.fp16:
        raise CompressError(f"{where}.keep_fp32: only means something with precision: fp16")
    if engine.precision is Precision.fp16 and config.onnx.opset < 19 and quantized_before(model, ctx):
        raise CompressError(f"{where}.precision: fp16 on a quantized model needs onnx.opset >= 19, where "
                            "QuantizeLinear/DequantizeLinear take float16 scales; set onnx.opset: 19")
    if (isinstance(engine, OnnxRuntimeEngine) and engine.precision is Precision.fp16
            and engine.optimization is not Optimization.disabled and quantized_before(model, ctx)):
        raise CompressError(f"{where}.optimization: ONNX Runtime's CPU graph optimizations miscompute float16 Q/DQ "
                            "graphs (measured: resnet18 top1 94.7 -> 87.2); set optimization: disabled, or keep "
                            "precision: fp32 for onnxruntime (float16 + INT8 is for backend tensorrt)")
    if (isinstance(engine, OnnxRuntimeEngine) and engine.precision is Precision.fp16 and config.triton is not None
            and quantized_before(model, ctx)):
        raise CompressError(f"{ctx.where}.triton: Triton's ONNX Runtime backend would serve the float16 Q/DQ graph with "
                            "graph optimizations on, which miscompute it; drop triton or use precision: fp32")
    if isinstance(engine, TensorRTEngine):
        if not isinstance(ctx.example_input, torch.Tensor):
            raise CompressError(f"{where}.backend: compress builds TensorRT engines for models of one input tensor; "
                                "this data has several (token ids, masks): use backend: onnxruntime, or build the "
                                "engine from model.onnx with trtexec and a profile per input")
        reason = tensorrt.why_unavailable()
        if reason is not None:
            raise CompressError(f"{where}.backend: tensorrt cannot run here: {reason}; use backend: onnxruntime")
        if config.onnx.dynamic_batch:
            try:
                profile = steps.trt_profile(engine, config.triton)
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
    """The 2:4 check of the written ONNX as report.json has it (:func:`steps.verify_sparsity`)."""
    return steps.verify_sparsity(model, onnx_path).to_dict()


def _engine_record(model: nn.Module, config: ExportConfig, engine: EngineOptions, exported: steps.ExportedOnnx,
                   source: Path, sparse_weights: bool, ctx: StageContext) -> tuple[EngineRecord, steps.Evaluation]:
    """Build the engine, score it on the eval split, time it and (quantized, ONNX Runtime) map its INT8 coverage."""
    built = steps.build_engine(source, engine, ctx.run_dir, dynamic_batch=config.onnx.dynamic_batch,
                               triton=config.triton, sparse_weights=sparse_weights)
    threads = engine.threads if isinstance(engine, OnnxRuntimeEngine) else None
    evaluation = steps.evaluate(built, exported, threads, ctx.splits.loader("eval"), output=ctx.metric_output)
    timed = steps.bench_engine(built, ctx.example_input, engine.batch_sizes, engine.bench_iters)
    covered = compared = None
    if exported.quantized and isinstance(engine, OnnxRuntimeEngine):
        covered = steps.int8_coverage(model, source, built.path, engine.optimization, config.onnx.target)
    if isinstance(engine, OnnxRuntimeEngine) and engine.bench_iters and is_main_process():
        compared = steps.compare_deployed(ctx.baseline, model, built.path, ctx.example_input, engine.batch_sizes,
                                          ctx.stage_dir, quantized=exported.quantized, iters=engine.bench_iters,
                                          threads=threads)
    record = EngineRecord(options=engine, built=built, source=source, bench=timed, coverage=covered,
                          metrics=metrics.score(ctx.metric, evaluation.engine, ctx.baseline_outputs),
                          compared=compared)
    return record, evaluation


@register("export", ExportConfig, check=_validate, changes_model=False,
          deploy_target=lambda config: (config.onnx.target, ("onnx", "target")))
def run_export(model: nn.Module, config: ExportConfig, ctx: StageContext) -> StageResult:
    _check(model, config, ctx)
    try:
        exported = steps.export_model(model, ctx.example_input, ctx.run_dir / "model.onnx", config.onnx,
                                      quantized=quant.is_quantized(model))
    except CompressError as exc:
        raise CompressError(f"{ctx.where}: {exc}") from None
    engine = config.engine
    fp16 = None
    if engine is not None and engine.precision is Precision.fp16:
        try:
            fp16 = steps.write_fp16(exported.path, engine.keep_fp32, rules=exported.info.rules is not None)
        except CompressError as exc:
            raise CompressError(f"{ctx.where}.engine.precision: {exc}") from None
    source = fp16.path if fp16 is not None else exported.path  # what the engine (and Triton) is built from
    sparsity = steps.verify_sparsity(model, source)
    record = check = None
    if engine is not None:
        record, evaluation = _engine_record(model, config, engine, exported, source, bool(sparsity.sparse_layers), ctx)
        if config.check is not None:
            model_out = ctx.input_model_outputs(model)  # one eval pass: reference and onnx_vs_model share it
            check = steps.check_engine(evaluation, model_out, ctx.baseline_outputs, config.check, ctx.metric)
    triton = None
    if config.triton is not None:
        triton = steps.write_triton(config.triton, ctx.run_dir, source, record.built if record else None, engine)
    report = ExportReport(onnx=exported, target=config.onnx.target, fp16=fp16, sparsity=sparsity, engine=record,
                          check=check, triton=triton)
    return StageResult(model, report=report.to_dict(), passed=report.passed)
