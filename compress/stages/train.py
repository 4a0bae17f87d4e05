"""``train``: fine-tune the model with the shared loop (also trains a baseline from scratch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import Field
from torch import nn

from compress.recipe import Strict
from compress.stages.context import StageContext, StageResult
from compress.stages.registry import register
from compress.train import Callback, FinetuneConfig, finetune


class TrainConfig(Strict):
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)


def _check(model: nn.Module, config: TrainConfig, ctx: StageContext) -> None:
    ctx.splits.loader("train", needed_by=ctx.where)


def stage_finetune(
    model: nn.Module, cfg: FinetuneConfig, ctx: StageContext, callbacks: Sequence[Callback] = ()
) -> dict[str, Any]:
    """Fine-tune ``model`` on the train split as a stage does; returns the report's ``finetune`` entry."""
    if cfg.seed is None:  # a resumed run must repeat the same stage exactly
        cfg = cfg.model_copy(update={"seed": ctx.recipe.body.seed + ctx.spec.index})
    result = finetune(
        model,
        ctx.splits.loader("train", needed_by=ctx.where),
        cfg,
        evaluate=ctx.score,
        callbacks=callbacks,
        device=ctx.device,
        progress=ctx.progress,
        desc=ctx.spec.dirname,
    )
    return {"history": result.history, "best_epoch": result.best_epoch}


@register("train", TrainConfig, check=_check)
def run_train(model: nn.Module, config: TrainConfig, ctx: StageContext) -> StageResult:
    return StageResult(model, info={"finetune": stage_finetune(model, config.finetune, ctx)})
