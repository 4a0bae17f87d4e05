"""What every quantizing stage (ptq, qat) shares: options, target agreement with the export, calibration.

Stage infrastructure, so that no stage imports another.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field
from torch import nn

from compress import quant
from compress.config import Strict
from compress.errors import CompressError
from compress.ptq.calibrate import calibrate
from compress.ptq.calibrators import Method
from compress.quant.spec import Target
from compress.stages.context import StageContext
from compress.stages.order import quantized_before
from compress.stages.registry import stage_types


class QuantOptions(Strict):
    """Options every quantizing stage shares."""

    target: Target | None = None  # default: the export stage's onnx.target, else tensorrt
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    calibrator: Method = Method.percentile
    percentile: Annotated[float, Field(gt=0, le=100)] = 99.99
    limit: Annotated[int, Field(gt=0)] | None = 512
    # nn.MultiheadAttention: int8 (projections and both attention MatMuls), float (projections only; ModelOpt's
    # disable_mha_qdq) or fused (left as it is)
    attention: quant.Attention = quant.Attention.int8


def export_target(ctx: StageContext) -> tuple[Target | None, str]:
    """The target of the first later stage that deploys for one (export's ``onnx.target``), and where it is."""
    registry = stage_types()
    for spec in ctx.recipe.stages[ctx.spec.index + 1:]:
        deploys = registry[spec.type].deploy_target
        if deploys is not None:
            target, keys = deploys(spec.config)
            return target, ctx.recipe.locate("stages", spec.index, spec.type, *keys)
    return None, ""


def resolve_target(config: QuantOptions, ctx: StageContext) -> Target:
    """The target to quantize for; an explicit one must agree with the export stage.

    Raises:
        CompressError: ``target`` differs from the export stage's ``onnx.target``.
    """
    later, where = export_target(ctx)
    if config.target is not None and later is not None and config.target is not later:
        raise CompressError(
            f"{ctx.where}.target: is {config.target.value} but {where} is {later.value}; "
            "quantizer placement must match the export target"
        )
    return config.target or later or Target.tensorrt


def calibration_split(ctx: StageContext) -> str:
    return "calibration" if ctx.splits.has("calibration") else "train"


def check_quant_options(model: nn.Module, config: QuantOptions, ctx: StageContext) -> None:
    """Dry-run checks: target agreement, layer patterns, calibration data present, no ignored options."""
    resolve_target(config, ctx)
    if quantized_before(model, ctx):
        refuse_ignored(config, ctx, ("include", "exclude", "attention"),
                       "the model is already quantized (quantizers are placed once)")
    else:
        quant.select_layers(model, config.include, config.exclude, where=ctx.where)
    ctx.splits.loader(calibration_split(ctx), needed_by=ctx.where)


def refuse_ignored(config: QuantOptions, ctx: StageContext, options: tuple[str, ...], why: str) -> None:
    """Options the user set that would have no effect are an error, not silently dropped.

    Raises:
        CompressError: one of ``options`` was given in the recipe.
    """
    given = [k for k in options if k in config.model_fields_set]
    if given:
        raise CompressError(f"{ctx.where}.{given[0]}: has no effect: {why}; remove it")


def quantize(model: nn.Module, config: QuantOptions, ctx: StageContext) -> tuple[nn.Module, dict]:
    """Prepare (unless already quantized for the same target) and calibrate; returns the report info."""
    target = resolve_target(config, ctx)
    if quant.is_quantized(model):
        if quant.target_of(model) is not target:
            raise CompressError(
                f"{ctx.where}: the model is already quantized for {quant.target_of(model).value}, not {target.value}"  # type: ignore[union-attr]
            )
        refuse_ignored(config, ctx, ("include", "exclude", "attention"),
                       "the model is already quantized (quantizers are placed once)")
        qmodel = model
    else:
        qmodel = quant.prepare(model, target, include=config.include, exclude=config.exclude,
                               attention=config.attention, example_input=ctx.example_input, where=ctx.where)
    qmodel.to(ctx.device)
    split = calibration_split(ctx)
    cal = calibrate(
        qmodel,
        ctx.splits.loader(split, needed_by=ctx.where),
        config.calibrator,
        percentile=config.percentile,
        limit=config.limit,
        device=ctx.device,
        progress=ctx.progress,
        where=f"{ctx.where} ({ctx.recipe.locate('data', split)})",
    )
    plan = quant.plan_of(qmodel)
    info = {
        "target": target.value,
        "calibration": {**cal.to_dict(), "split": split},
        "quantized_layers": len(plan.layers),
        "graph_quantizers": len(plan.graph_quantizers),
    }
    if plan.graph_skipped:
        info["graph_skipped"] = plan.graph_skipped
    if plan.attention or plan.sdpa:  # nn.MultiheadAttention modules and F.scaled_dot_product_attention sites
        info["attention"] = {"modules": len(plan.attention) + len(plan.sdpa), "matmuls": quant.attention_mode(qmodel).value}
    if plan.sdpa_skipped:
        info["attention_skipped"] = plan.sdpa_skipped
    if plan.kept_float:
        info["kept_float"] = plan.kept_float
    return qmodel, info


def calibration_warnings(info: dict) -> list[str]:
    """The calibration table's warnings (layers that clip much), for the stage's result."""
    return list(info.get("calibration", {}).get("warnings", []))
