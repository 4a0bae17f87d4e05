"""``train``: fine-tune the model with the shared loop (also trains a baseline from scratch)."""

from __future__ import annotations

from pydantic import Field
from torch import nn

from compress.config import Strict
from compress.stages.context import StageContext, StageResult
from compress.stages.finetune import StageFinetune, stage_finetune
from compress.stages.registry import register


class TrainConfig(Strict):
    finetune: StageFinetune = Field(default_factory=StageFinetune)


def _check(model: nn.Module, config: TrainConfig, ctx: StageContext) -> None:
    ctx.splits.loader("train", needed_by=ctx.where)


@register("train", TrainConfig, check=_check)
def run_train(model: nn.Module, config: TrainConfig, ctx: StageContext) -> StageResult:
    return StageResult(model, info={"finetune": stage_finetune(model, config.finetune, ctx)})
