"""``train``: fine-tune the model with the shared loop (also trains a baseline from scratch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field
from torch import nn

from compress.recipe import Strict
from compress.stages.context import StageContext, StageResult
from compress.stages.registry import register
from compress.train import Callback, FinetuneConfig, finetune

if TYPE_CHECKING:
    from compress.distill import Distiller


class TrainConfig(Strict):
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)


def _check(model: nn.Module, config: TrainConfig, ctx: StageContext) -> None:
    ctx.splits.loader("train", needed_by=ctx.where)


def check_finetune(model: nn.Module, config: Any, ctx: StageContext) -> None:
    """Dry-run a stage's ``finetune.distill`` block (any stage type with a ``finetune``)."""
    cfg = getattr(config, "finetune", None)
    if isinstance(cfg, FinetuneConfig) and cfg.distill is not None and cfg.epochs:
        from compress.distill.teacher import check_distill
        from compress.ptq.stage import quantized_before

        quantized = ctx.spec.type == "qat" or quantized_before(model, ctx)
        check_distill(cfg.distill, model, ctx, f"{ctx.where}.finetune.distill", student_quantized=quantized)


def stage_finetune(
    model: nn.Module,
    cfg: FinetuneConfig,
    ctx: StageContext,
    callbacks: Sequence[Callback] = (),
    *,
    distiller: Distiller | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model`` on the train split as a stage does; returns the report's ``finetune`` entry.

    A ``finetune.distill`` block (or ``distiller``, from the distill stage) adds its teacher's loss.
    """
    if cfg.seed is None:  # a resumed run must repeat the same stage exactly
        cfg = cfg.model_copy(update={"seed": ctx.recipe.body.seed + ctx.spec.index})
    owned = None  # a finetune.distill block: this call builds (and closes) the distiller
    if cfg.distill is not None and cfg.epochs:
        from compress.distill.teacher import make_distiller

        owned = distiller = make_distiller(cfg.distill, model, ctx, f"{ctx.where}.finetune.distill")
    if distiller is not None:
        callbacks = [*callbacks, distiller.callback()]
    try:
        result = finetune(
            model,
            ctx.splits.loader("train", needed_by=ctx.where),
            cfg.model_copy(update={"distill": None}),
            evaluate=ctx.score,
            callbacks=callbacks,
            device=ctx.device,
            progress=ctx.progress,
            desc=ctx.spec.dirname,
        )
    finally:
        if owned is not None:
            owned.close()
    info: dict[str, Any] = {"history": result.history, "best_epoch": result.best_epoch}
    if owned is not None:
        info["distill"] = owned.report(cfg.distill.describe_teacher())  # type: ignore[union-attr]
    return info


@register("train", TrainConfig, check=_check)
def run_train(model: nn.Module, config: TrainConfig, ctx: StageContext) -> StageResult:
    return StageResult(model, info={"finetune": stage_finetune(model, config.finetune, ctx)})
