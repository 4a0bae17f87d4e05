"""``train``: fine-tune the model with the shared loop (also trains a baseline from scratch)."""

from __future__ import annotations

from pydantic import Field
from torch import nn

from compress.recipe import Strict
from compress.stages.context import StageContext, StageResult
from compress.stages.registry import register
from compress.train import FinetuneConfig, finetune


class TrainConfig(Strict):
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)


def _check(model: nn.Module, config: TrainConfig, ctx: StageContext) -> None:
    ctx.splits.loader("train", needed_by=ctx.where)


@register("train", TrainConfig, check=_check)
def run_train(model: nn.Module, config: TrainConfig, ctx: StageContext) -> StageResult:
    cfg = config.finetune
    if cfg.seed is None:  # a resumed run must repeat the same stage exactly
        cfg = cfg.model_copy(update={"seed": ctx.recipe.body.seed + ctx.spec.index})
    result = finetune(
        model,
        ctx.splits.loader("train", needed_by=ctx.where),
        cfg,
        evaluate=ctx.score,
        device=ctx.device,
        progress=ctx.progress,
        desc=ctx.spec.dirname,
    )
    return StageResult(model, info={"finetune": {"history": result.history, "best_epoch": result.best_epoch}})
