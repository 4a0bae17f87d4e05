"""``prune``: L1 unstructured (masks held through the fine-tune) or channel pruning (a smaller model)."""

from __future__ import annotations

import copy
import tempfile
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.config import Strict
from compress.errors import CompressError
from compress.export.options import BACKENDS, OnnxOptions, OnnxRuntimeEngine, TensorRTEngine
from compress.inputs import move_inputs
from compress.models import count_params
from compress.profile import count_macs
from compress.prune import latency
from compress.prune.channel import (
    DEFAULT_ROUND_TO,
    ChannelOptions,
    ChannelPruner,
    Importance,
    has_attention,
    overshoot,
)
from compress.prune.engine_timer import Engine, Int8
from compress.prune.heads import HeadOptions
from compress.prune.latency_search import first_ratio
from compress.prune.latency_target import LatencyTarget
from compress.prune.schedule import Curve, Schedule
from compress.prune.to_latency import default_round_to, resolve_engine, search_latency, time_final
from compress.prune.unstructured import MagnitudePruner, Scope, weighted_layers
from compress.quant.spec import Target
from compress.select import select_names
from compress.stages.context import StageContext, StageResult
from compress.stages.finetune import StageFinetune, stage_finetune
from compress.stages.order import effects, quantized_before, refuse_after_sparsity
from compress.stages.quantize import QuantOptions, calibration_split, export_target
from compress.stages.registry import Effect, register, stage_types
from compress.train import is_main_process

Ratio = Annotated[float, Field(ge=0, lt=1)]


class Method(str, Enum):
    l1_unstructured = "l1_unstructured"
    channel = "channel"


class ScheduleConfig(Strict):
    steps: Annotated[int, Field(ge=1)]
    start_ratio: Ratio = 0.0
    end_ratio: Ratio
    curve: Curve = Curve.cubic
    end_at: Annotated[float, Field(gt=0, le=1)] = 0.75  # fraction of the fine-tune by which end_ratio is reached


class LatencyCheck(Strict):
    """Time the model before and after pruning in ONNX Runtime (CPU, level ``all``), interleaved."""

    # bounded like the export engine's: a batch of 10^9 inputs needs terabytes, a million threads stalls the machine
    batch_sizes: list[Annotated[int, Field(ge=1, le=65536)]] = Field(default_factory=lambda: [1, 8], min_length=1)
    threads: Annotated[int, Field(ge=1, le=1024)] | None = None  # intra-op threads; None: ONNX Runtime's default
    seconds: Annotated[float, Field(gt=0, le=3600)] = 1.0  # timing budget over all batch sizes (at least 10 rounds each)


# A met latency target reached below this share of the target is worth saying (coarse channel steps).
OVERSHOOT_LATENCY = 0.8
_CHANNEL_ONLY = ("macs_reduction", "latency", "importance", "round_to", "steps", "latency_check", "prune_num_heads",
                 "prune_head_dims", "head_pruning_ratio")
_L1_ONLY = ("schedule",)


class PruneConfig(Strict):
    method: Method
    ratio: Ratio | None = None  # channel: fraction of each group's channels; l1: of the weights
    macs_reduction: Annotated[float, Field(gt=1)] | None = None  # channel: MACs before / after, instead of ratio
    latency: LatencyTarget | None = None  # channel: engine latency after / before, instead of ratio (searched)
    schedule: ScheduleConfig | None = None  # l1: gradual pruning across the fine-tune, instead of ratio
    importance: Importance = Importance.l1
    scope: Scope = Scope.local
    # channel: None = DEFAULT_ROUND_TO (8), with latency the timed engine's multiple; 1 = no rounding
    round_to: Annotated[int, Field(ge=1)] | None = None
    latency_check: bool | LatencyCheck = True  # channel: engine latency before/after (false: skip, faster)
    steps: Annotated[int, Field(ge=1)] = 1  # channel: prune in this many steps, fine-tuning after each
    # channel, attention heads (nn.MultiheadAttention, Hugging Face, timm; Torch-Pruning's names): go head-wise
    prune_num_heads: bool = False  # remove whole attention heads
    prune_head_dims: bool = True  # remove the same number of channels inside every head
    head_pruning_ratio: Ratio | None = None  # fraction of heads removed; None: the channel ratio
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    finetune: StageFinetune = Field(default_factory=StageFinetune)

    @model_validator(mode="after")
    def _consistent(self) -> PruneConfig:
        wrong = _L1_ONLY if self.method is Method.channel else _CHANNEL_ONLY
        given = [k for k in wrong if k in self.model_fields_set]
        if given:
            raise ValueError(f"'{given[0]}' does not apply to method {self.method.value}")
        targets = [k for k in ("ratio", "macs_reduction", "schedule", "latency") if getattr(self, k) is not None]
        if self.latency is not None and len(targets) > 1:
            other = next(k for k in targets if k != "latency")
            raise ValueError(f"latency cannot be combined with {other}: the latency search chooses the ratio; "
                             f"remove {other}")
        if self.latency is not None and "latency_check" in self.model_fields_set:
            raise ValueError("latency_check has no effect with latency: the search times the engine already; remove it")
        if len(targets) != 1:
            allowed = "ratio, macs_reduction or latency" if self.method is Method.channel else "ratio or schedule"
            raise ValueError(f"give exactly one of {allowed} (got {', '.join(targets) or 'none'})")
        if self.schedule is not None and self.finetune.epochs == 0:
            raise ValueError("schedule prunes gradually during the fine-tune, which has epochs: 0")
        if self.head_pruning_ratio is not None and not self.prune_num_heads:
            raise ValueError("head_pruning_ratio needs prune_num_heads: true")
        return self


def _round_to(config: PruneConfig, ctx: StageContext) -> int:
    if config.round_to is not None:
        return config.round_to
    if config.latency is not None:
        return default_round_to(config.latency, _deployed(ctx)[0], _quantized_later(ctx) is not False)
    return DEFAULT_ROUND_TO


def _options(config: PruneConfig, ctx: StageContext) -> ChannelOptions:
    head_options = HeadOptions(config.prune_num_heads, config.prune_head_dims, config.head_pruning_ratio)
    return ChannelOptions(config.importance, config.scope, _round_to(config, ctx), tuple(config.include),
                          tuple(config.exclude), head_options)


def _latency_check(config: PruneConfig) -> LatencyCheck | None:
    if config.latency is not None:  # the search timed the chosen model against the unpruned one already
        return None
    check = config.latency_check
    return (LatencyCheck() if check else None) if isinstance(check, bool) else check


def _deployed(ctx: StageContext) -> tuple[OnnxRuntimeEngine | TensorRTEngine | None, str]:
    """The engine options of the first later stage that deploys (export), and where they are in the recipe."""
    registry = stage_types()
    for spec in ctx.recipe.stages[ctx.spec.index + 1:]:
        engine = getattr(spec.config, "engine", None)
        if registry[spec.type].deploy_target is not None and isinstance(engine, BACKENDS):
            return engine, ctx.recipe.locate("stages", spec.index, spec.type, "engine")  # type: ignore[return-value]
    return None, ""


def _deployed_opset(ctx: StageContext) -> int:
    """The ONNX opset the first later deploying stage exports at (13 when none does)."""
    registry = stage_types()
    for spec in ctx.recipe.stages[ctx.spec.index + 1:]:
        onnx_options = getattr(spec.config, "onnx", None)
        if registry[spec.type].deploy_target is not None and isinstance(onnx_options, OnnxOptions):
            return onnx_options.opset
    return 13


def _quantized_later(ctx: StageContext) -> QuantOptions | bool:
    """The options of the first later stage that quantizes (True when they are not :class:`QuantOptions`), or False."""
    for spec in ctx.recipe.stages[ctx.spec.index + 1:]:
        if Effect.QUANTIZES in effects(spec):
            return spec.config if isinstance(spec.config, QuantOptions) else True
    return False


def _int8(ctx: StageContext) -> Int8 | None:
    """How to time INT8 engines when a later stage quantizes: its target and layers, calibration data."""
    later = _quantized_later(ctx)
    if later is False:
        return None
    options = later if isinstance(later, QuantOptions) else None
    target = (options.target if options is not None else None) or export_target(ctx)[0] or Target.tensorrt
    data = ctx.splits.loader(calibration_split(ctx), needed_by=f"{ctx.where}.latency (timing INT8 engines)")
    if options is None:
        return Int8(data, target)
    return Int8(data, target, tuple(options.include), tuple(options.exclude), options.attention)


def _engine_where(ctx: StageContext) -> str:
    return _deployed(ctx)[1] or "the export stage's engine"


def dry_run(model: nn.Module, config: PruneConfig, ctx: StageContext) -> nn.Module:
    """A channel-pruned copy of ``model`` with the shapes the stage will leave (nothing trained).

    Raises:
        CompressError: the pruning cannot be done (tracer, patterns, target out of reach, broken forward).
    """
    pruner = ChannelPruner(copy.deepcopy(model), ctx.example_input, _options(config, ctx), where=ctx.where)
    if config.macs_reduction is not None:
        pruner.prune_to_macs(config.macs_reduction)  # the final target must be reachable
    elif config.latency is not None:  # the ratio is measured at run time: the search's first candidate
        pruner.prune(first_ratio(config.latency.target))
    else:
        pruner.prune(config.ratio)  # type: ignore[arg-type]
    return pruner.model


def _check(model: nn.Module, config: PruneConfig, ctx: StageContext) -> str | None:
    refuse_after_sparsity(model, ctx, "prune")
    if quantized_before(model, ctx):
        raise CompressError(f"{ctx.where}: prune must come before quantization (ptq/qat): "
                            "the quantizers' ranges would not match the pruned weights")
    note = None
    if config.method is Method.l1_unstructured:
        select_names(weighted_layers(model), config.include, config.exclude, where=ctx.where,
                     what="Conv/Linear layer to prune")
    else:  # dry run on a copy: tracer, patterns, every-channel-gone and forward checks, nothing trained
        example = move_inputs(ctx.example_input, next(model.parameters(), torch.empty(0)).device)
        achieved = count_macs(model, example) / max(count_macs(dry_run(model, config, ctx), example), 1)
        rounding = f"round_to {_round_to(config, ctx)}" + (" (default)" if config.round_to is None else "")
        note = f"dry run: MACs / {achieved:.2f}, {rounding}"
        if config.macs_reduction is not None:
            found = overshoot(config.macs_reduction, achieved, _round_to(config, ctx), attention=has_attention(model))
            note += f"; {found or 'on target'}"
        if config.latency is not None:
            note = _latency_note(config.latency, ctx, note)
    if config.finetune.epochs:
        ctx.splits.loader("train", needed_by=ctx.where)
    return note


@register("prune", PruneConfig, check=_check, dry_run=dry_run,
          effects=lambda config: Effect.RESHAPES if config.method is Method.channel else Effect.NONE)
def run_prune(model: nn.Module, config: PruneConfig, ctx: StageContext) -> StageResult:
    if config.method is Method.l1_unstructured:
        return StageResult(model, info=_run_l1(model, config, ctx))
    check = _latency_check(config) if is_main_process() else None  # one timing, not one per DDP rank
    figures: list[latency.EngineLatency] | None = []
    unmeasured = None
    if check is None:
        info = _run_channel(model, config, ctx)
    else:
        ctx.stage_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=ctx.stage_dir, prefix="latency-") as tmp:
            example, folder = ctx.example_input, Path(tmp)
            before, unmeasured = latency.run_advisory(
                lambda: latency.export_for_timing(model, example, folder / "before.onnx"))
            info = _run_channel(model, config, ctx)
            if before is not None:
                figures, unmeasured = latency.run_advisory(lambda: latency.measure(
                    before, latency.export_for_timing(model, example, folder / "after.onnx"), example,
                    check.batch_sizes, threads=check.threads, seconds=check.seconds))
        info["prune"]["engine_latency_ms"] = [f.to_report() for f in figures or []]
    warnings = _warnings(info["prune"], config, figures or [])
    return StageResult(model, info=info, warnings=warnings + ([unmeasured] if unmeasured else []))


def _latency_note(lat: LatencyTarget, ctx: StageContext, note: str) -> str:
    """The plan's line for a latency target: the engine, the search's cost, and the dry run at its first guess.

    Raises:
        CompressError: the backend cannot run here or differs from the export stage's; under torchrun.
    """
    engine = resolve_engine(lat, _deployed(ctx)[0], None, ctx.where, _engine_where(ctx))
    int8 = _quantized_later(ctx) is not False
    precision = "INT8 (calibrated copies: a later stage quantizes)" if int8 else engine.precision.value
    return (f"latency target {lat.target:g} at batch {lat.batch_size} on {engine.backend.value} ({precision}): "
            f"{lat.candidates} candidates x {lat.repeats} runs x {lat.rounds} rounds timed at run time; first "
            f"candidate ratio {first_ratio(lat.target):.3f}, {note}")


def _warnings(info: dict[str, Any], config: PruneConfig, figures: list[latency.EngineLatency]) -> list[str]:
    """Overshoot of a MACs target, measured slowdowns and a latency target not met, one line each."""
    found = overshoot(config.macs_reduction, info["macs_reduction"], info["round_to"], attention="attention" in info) \
        if config.macs_reduction is not None else None
    search = info.get("latency")
    return ([found] if found else []) + latency.slowdown_warnings(figures, info["round_to"]) + \
        (_latency_warnings(search, config) if search is not None else [])


def _latency_warnings(search: dict[str, Any], config: PruneConfig) -> list[str]:
    """A target not met (how close it came), or met far past the target because channel steps are coarse; the
    model left after several steps no longer meeting it."""
    final = search.get("final")
    if final is not None and search["met"] and not final["met"]:
        return [f"latency target {search['target']:g}: the candidate timed met it, but the model left after "
                f"{config.steps} steps runs at x{final['latency_ratio']:.3f} (runs {final['spread'][0]:.3f}-"
                f"{final['spread'][1]:.3f}, MACs / {final['macs_reduction']:.2f}): fine-tuning between steps moved "
                "channels between layers; use steps: 1 or scope: local"]
    if not search["met"]:
        return [f"latency target {search['target']:g} not met: the closest candidate ({search['chosen']}) runs at "
                f"x{search['latency_ratio']:.3f} of the unpruned engine (runs {search['spread'][0]:.3f}-"
                f"{search['spread'][1]:.3f}, {search['gap']:+.3f}); kept it. {search['stopped'] or ''}".rstrip()]
    slower = [c for c in search["path"] if c["latency_ratio"] > search["target"]]
    if search["latency_ratio"] >= search["target"] * OVERSHOOT_LATENCY or not slower:
        return []
    step = min(slower, key=lambda c: c["latency_ratio"])
    finer = "scope: global" if config.scope is Scope.local else "a smaller round_to"
    return [f"latency target {search['target']:g}: the chosen candidate runs at x{search['latency_ratio']:.3f}, well "
            f"past the target (MACs / {search['macs_reduction']:.2f}); the closest less pruned one ran "
            f"x{step['latency_ratio']:.3f} (MACs / {step['macs_reduction']:.2f}): channel steps are coarse here "
            f"(round_to: {search['engine']['round_to']}); {finer} gives finer ones"]


def _run_l1(model: nn.Module, config: PruneConfig, ctx: StageContext) -> dict[str, Any]:
    schedule = Schedule(**config.schedule.model_dump()) if config.schedule is not None else None
    pruner = MagnitudePruner(model, config.ratio, schedule=schedule, scope=config.scope,
                             include=config.include, exclude=config.exclude, where=ctx.where)
    info: dict[str, Any] = {}
    if config.finetune.epochs:
        info["finetune"] = stage_finetune(model, config.finetune, ctx, [pruner.callback()])
    info["prune"] = {"method": config.method.value, "scope": config.scope.value, **pruner.make_permanent()}
    return info


def _engine(lat: LatencyTarget, ctx: StageContext) -> Engine:
    """The deployed engine to time on.

    Raises:
        CompressError: under torchrun (one process must time), the backend cannot run here.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        raise CompressError(f"{ctx.where}.latency: the latency search times engines in one process; run this "
                            "stage without torchrun (or prune with the ratio it found)")
    return resolve_engine(lat, _deployed(ctx)[0], _int8(ctx), ctx.where, _engine_where(ctx), _deployed_opset(ctx))


def _run_channel(model: nn.Module, config: PruneConfig, ctx: StageContext) -> dict[str, Any]:
    pruner = ChannelPruner(model, ctx.example_input, _options(config, ctx), where=ctx.where)
    example = pruner.example  # on the model's device
    timed = (config.latency, _engine(config.latency, ctx)) if config.latency is not None else None
    found = None
    if timed is not None:
        ctx.stage_dir.mkdir(parents=True, exist_ok=True)
        found = search_latency(pruner, *timed, ctx.stage_dir, pruner.options.round_to)
    # several steps (fine-tuned between) may leave other channel counts than the timed candidate: time the result
    unpruned = copy.deepcopy(model) if found is not None and config.steps > 1 else None
    total = found.chosen.ratio if found is not None and found.chosen is not None else config.ratio
    steps = []
    for k in range(1, config.steps + 1):
        if config.macs_reduction is not None:
            ratio, changed = pruner.prune_to_macs(config.macs_reduction ** (k / config.steps))
        else:
            ratio = total * k / config.steps  # type: ignore[operator]
            changed = pruner.prune(ratio)
        entry: dict[str, Any] = {"step": k, "ratio": round(ratio, 4), "params": count_params(model),
                                 "macs": count_macs(model, example), "pruned_metric": ctx.score(model),
                                 "channels": changed}
        if config.finetune.epochs:
            entry["finetune"] = stage_finetune(model, config.finetune, ctx)
        steps.append(entry)
    resized = pruner.finish()
    if timed is not None and found is not None and unpruned is not None:
        time_final(found, unpruned, model, example, *timed, ctx.stage_dir)
    return {"prune": {
        "method": config.method.value, "importance": config.importance.value, "scope": config.scope.value,
        "round_to": _round_to(config, ctx), "round_to_default": config.round_to is None,
        "macs_reduction_requested": config.macs_reduction,
        "macs_reduction": round(pruner.macs_before / max(steps[-1]["macs"], 1), 4),
        "steps": steps, "skipped": pruner.skipped, "resized_modules": len(resized),
    } | ({"attention": pruner.heads()} if pruner.heads() else {})
      | ({"latency": found.to_report()} if found is not None else {})}
