"""``distill``: fine-tune the model (or a new, smaller ``student``) against a teacher."""

from __future__ import annotations

from pydantic import Field, model_validator
from torch import nn

from compress import models
from compress.distill.options import DistillOptions
from compress.errors import CompressError
from compress.model_spec import ModelSpec
from compress.stages.context import StageContext, StageResult
from compress.stages.finetune import StageFinetune, stage_finetune
from compress.stages.order import quantized_before
from compress.stages.registry import Effect, register
from compress.stages.teacher import check_distill, load_teacher, make_distiller


class DistillConfig(DistillOptions):
    student: ModelSpec | None = None  # train this model instead of the stage's input model
    finetune: StageFinetune = Field(default_factory=lambda: StageFinetune(epochs=3))

    @model_validator(mode="after")
    def _options_here(self) -> DistillConfig:
        if self.finetune.distill is not None:
            raise ValueError("the distill stage takes its teacher and loss options at the stage level, "
                             "not in finetune.distill")
        if self.finetune.epochs == 0:
            raise ValueError("finetune.epochs is 0: the distill stage would not train")
        return self


def _student(model: nn.Module, config: DistillConfig, ctx: StageContext) -> nn.Module:
    if config.student is None:
        return model
    spec = config.student
    try:
        student = models.load_model(spec.checkpoint, spec.factory, spec.kwargs, trust=ctx.trust, allow=ctx.factories)
    except CompressError as exc:
        raise type(exc)(f"{ctx.where}.student: {exc}") from None
    return student.to(ctx.device)


def _check(model: nn.Module, config: DistillConfig, ctx: StageContext) -> None:
    quantized = config.student is None and quantized_before(model, ctx)
    check_distill(config, _student(model, config, ctx), ctx, ctx.where, student_quantized=quantized)


@register("distill", DistillConfig, check=_check,
          effects=lambda config: Effect.NEW_MODEL if config.student is not None else Effect.NONE)
def run_distill(model: nn.Module, config: DistillConfig, ctx: StageContext) -> StageResult:
    student = _student(model, config, ctx)
    teacher = load_teacher(config, ctx, ctx.where)
    info = {"teacher_metrics": ctx.evaluate(teacher)}
    distiller = make_distiller(config, student, ctx, ctx.where, teacher=teacher)
    try:
        info["finetune"] = stage_finetune(student, config.finetune, ctx, distiller=distiller)
    finally:
        distiller.close()
    info["distill"] = distiller.report(config.describe_teacher())
    if config.student is not None:
        info["distill"]["student"] = config.student.factory or config.student.checkpoint
    return StageResult(student, info=info)
