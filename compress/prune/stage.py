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
from compress.prune.heads import HeadOptions
from compress.prune.schedule import Curve, Schedule
from compress.prune.unstructured import MagnitudePruner, Scope, weighted_layers
from compress.select import select_names
from compress.stages.context import StageContext, StageResult
from compress.stages.finetune import StageFinetune, stage_finetune
from compress.stages.order import quantized_before, refuse_after_sparsity
from compress.stages.registry import Effect, register
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


_CHANNEL_ONLY = ("macs_reduction", "importance", "round_to", "steps", "latency_check", "prune_num_heads",
                 "prune_head_dims", "head_pruning_ratio")
_L1_ONLY = ("schedule",)


class PruneConfig(Strict):
    method: Method
    ratio: Ratio | None = None  # channel: fraction of each group's channels; l1: of the weights
    macs_reduction: Annotated[float, Field(gt=1)] | None = None  # channel: MACs before / after, instead of ratio
    schedule: ScheduleConfig | None = None  # l1: gradual pruning across the fine-tune, instead of ratio
    importance: Importance = Importance.l1
    scope: Scope = Scope.local
    round_to: Annotated[int, Field(ge=1)] | None = None  # channel: None = DEFAULT_ROUND_TO (8); 1 = no rounding
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
        targets = [k for k in ("ratio", "macs_reduction", "schedule") if getattr(self, k) is not None]
        if len(targets) != 1:
            allowed = "ratio or macs_reduction" if self.method is Method.channel else "ratio or schedule"
            raise ValueError(f"give exactly one of {allowed} (got {', '.join(targets) or 'none'})")
        if self.schedule is not None and self.finetune.epochs == 0:
            raise ValueError("schedule prunes gradually during the fine-tune, which has epochs: 0")
        if self.head_pruning_ratio is not None and not self.prune_num_heads:
            raise ValueError("head_pruning_ratio needs prune_num_heads: true")
        return self


def _round_to(config: PruneConfig) -> int:
    return DEFAULT_ROUND_TO if config.round_to is None else config.round_to


def _options(config: PruneConfig) -> ChannelOptions:
    head_options = HeadOptions(config.prune_num_heads, config.prune_head_dims, config.head_pruning_ratio)
    return ChannelOptions(config.importance, config.scope, _round_to(config), tuple(config.include),
                          tuple(config.exclude), head_options)


def _latency_check(config: PruneConfig) -> LatencyCheck | None:
    check = config.latency_check
    return (LatencyCheck() if check else None) if isinstance(check, bool) else check


def dry_run(model: nn.Module, config: PruneConfig, ctx: StageContext) -> nn.Module:
    """A channel-pruned copy of ``model`` with the shapes the stage will leave (nothing trained).

    Raises:
        CompressError: the pruning cannot be done (tracer, patterns, target out of reach, broken forward).
    """
    pruner = ChannelPruner(copy.deepcopy(model), ctx.example_input, _options(config), where=ctx.where)
    if config.macs_reduction is not None:
        pruner.prune_to_macs(config.macs_reduction)  # the final target must be reachable
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
        rounding = f"round_to {_round_to(config)}" + (" (default)" if config.round_to is None else "")
        note = f"dry run: MACs / {achieved:.2f}, {rounding}"
        if config.macs_reduction is not None:
            found = overshoot(config.macs_reduction, achieved, _round_to(config), attention=has_attention(model))
            note += f"; {found or 'on target'}"
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


def _warnings(info: dict[str, Any], config: PruneConfig, figures: list[latency.EngineLatency]) -> list[str]:
    """Overshoot of a MACs target and measured slowdowns, one line each."""
    found = overshoot(config.macs_reduction, info["macs_reduction"], info["round_to"], attention="attention" in info) \
        if config.macs_reduction is not None else None
    return ([found] if found else []) + latency.slowdown_warnings(figures, info["round_to"])


def _run_l1(model: nn.Module, config: PruneConfig, ctx: StageContext) -> dict[str, Any]:
    schedule = Schedule(**config.schedule.model_dump()) if config.schedule is not None else None
    pruner = MagnitudePruner(model, config.ratio, schedule=schedule, scope=config.scope,
                             include=config.include, exclude=config.exclude, where=ctx.where)
    info: dict[str, Any] = {}
    if config.finetune.epochs:
        info["finetune"] = stage_finetune(model, config.finetune, ctx, [pruner.callback()])
    info["prune"] = {"method": config.method.value, "scope": config.scope.value, **pruner.make_permanent()}
    return info


def _run_channel(model: nn.Module, config: PruneConfig, ctx: StageContext) -> dict[str, Any]:
    pruner = ChannelPruner(model, ctx.example_input, _options(config), where=ctx.where)
    example = pruner.example  # on the model's device
    steps = []
    for k in range(1, config.steps + 1):
        if config.macs_reduction is not None:
            ratio, changed = pruner.prune_to_macs(config.macs_reduction ** (k / config.steps))
        else:
            ratio = config.ratio * k / config.steps  # type: ignore[operator]
            changed = pruner.prune(ratio)
        entry: dict[str, Any] = {"step": k, "ratio": round(ratio, 4), "params": count_params(model),
                                 "macs": count_macs(model, example), "pruned_metric": ctx.score(model),
                                 "channels": changed}
        if config.finetune.epochs:
            entry["finetune"] = stage_finetune(model, config.finetune, ctx)
        steps.append(entry)
    resized = pruner.finish()
    return {"prune": {
        "method": config.method.value, "importance": config.importance.value, "scope": config.scope.value,
        "round_to": _round_to(config), "round_to_default": config.round_to is None,
        "macs_reduction_requested": config.macs_reduction,
        "macs_reduction": round(pruner.macs_before / max(steps[-1]["macs"], 1), 4),
        "steps": steps, "skipped": pruner.skipped, "resized_modules": len(resized),
    } | ({"attention": pruner.heads()} if pruner.heads() else {})}
