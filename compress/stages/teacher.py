"""Recipe teachers (``baseline``, ``stage N``, a model spec) and the distiller a stage trains with."""

from __future__ import annotations

from torch import nn

from compress import models, quant
from compress.distill.cache import check_budget
from compress.distill.distiller import Distiller
from compress.distill.options import DistillOptions, teacher_stage
from compress.errors import CompressError
from compress.inputs import move_inputs
from compress.stages.context import StageContext
from compress.stages.order import effects, quantizes_within
from compress.stages.registry import Effect, stage_types
from compress.train import barrier


def _stage_reference(n: int, ctx: StageContext, where: str) -> str:
    """The run-relative checkpoint of ``stage n``, which must be an earlier, model-changing stage."""
    if n > ctx.spec.index:
        raise CompressError(f"{where}.teacher: 'stage {n}' is not an earlier stage (this is stage {ctx.spec.index + 1})")
    spec = ctx.recipe.stages[n - 1]
    if not stage_types()[spec.type].changes_model:
        raise CompressError(f"{where}.teacher: stage {n} is '{spec.type}', which writes no model checkpoint")
    return spec.checkpoint


def _stand_in(n: int, ctx: StageContext) -> nn.Module:
    """What stage ``n`` will hand on, as far as a dry run can tell: the architecture of the last
    ``distill`` stage's ``student`` up to there, else the baseline (stages keep outputs and names)."""
    for spec in reversed(ctx.recipe.stages[:n]):
        student = getattr(spec.config, "student", None)
        if Effect.NEW_MODEL in effects(spec) and student is not None:
            return models.load_model(student.checkpoint, student.factory, student.kwargs,
                                     trust=ctx.trust, allow=ctx.factories).to(ctx.device).eval()
    return ctx.baseline


def _quantized_by(n: int, ctx: StageContext) -> bool:
    return quant.is_quantized(ctx.baseline) or quantizes_within(ctx.recipe.stages[:n])


def load_teacher(options: DistillOptions, ctx: StageContext, where: str, *, dry_run: bool = False) -> nn.Module:
    """The teacher on the run's device, in eval mode, frozen.

    ``dry_run`` (``compress validate``): a ``stage N`` teacher does not exist yet; what stage N
    will produce stands in for it.
    """
    teacher = options.teacher
    if teacher == "baseline":
        return ctx.baseline
    n = teacher_stage(teacher)
    try:
        if n is not None:
            checkpoint = _stage_reference(n, ctx, where)
            if dry_run:
                return _stand_in(n, ctx)
            barrier()  # under torchrun rank 0 wrote it; every rank reads it after that
            model = models.load_model(ctx.run_dir / checkpoint, trust=ctx.trust, allow=ctx.factories)
        else:
            assert not isinstance(teacher, str)
            model = models.load_model(teacher.checkpoint, teacher.factory, teacher.kwargs, trust=ctx.trust, allow=ctx.factories)
    except CompressError as exc:
        if str(exc).startswith(f"{where}.teacher"):
            raise
        raise type(exc)(f"{where}.teacher: {exc}") from None
    return model.to(ctx.device).eval().requires_grad_(False)


def make_distiller(
    options: DistillOptions,
    student: nn.Module,
    ctx: StageContext,
    where: str,
    *,
    teacher: nn.Module | None = None,
) -> Distiller:
    """A :class:`Distiller` for ``student`` with the recipe's teacher (unless given), probed on the
    example input (output shapes, hint layers and projections checked before any training)."""
    if teacher is None:
        teacher = load_teacher(options, ctx, where)
    given = options.model_dump(include=set(DistillOptions.model_fields) - {"teacher", "alpha"})
    alpha = options.alpha if "alpha" in options.model_fields_set else None
    return Distiller(student, teacher, alpha=alpha, **given, example_input=move_inputs(ctx.example_input, ctx.device), where=where,
                     output=ctx.metric_output)


def _leaf_hints(names: list[str], model: nn.Module, where: str, whose: str) -> None:
    """A quantized model is a traced graph whose blocks are inlined: only leaf layers still run."""
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules or not any(True for _ in modules[name].children()):
            continue
        leaves = [f"'{name}.{sub}'" for sub, m in modules[name].named_modules()
                  if sub and not any(True for _ in m.children()) and isinstance(m, (nn.Conv2d, nn.Linear))]
        raise CompressError(
            f"{where}.hints: the {whose} is quantized (ptq/qat) by then, a traced graph in which the block "
            f"'{name}' does not run as a module: name a leaf layer such as {' or '.join(leaves[:2]) or 'a Conv'}"
        )


def check_distill(
    options: DistillOptions, student: nn.Module, ctx: StageContext, where: str, *, student_quantized: bool
) -> None:
    """``compress validate``'s dry run: teacher loads, shapes agree, hint layers exist (and will run:
    leaf layers where the model is quantized by then), the cache fits.

    Raises:
        CompressError: naming ``where`` and the option at fault.
    """
    if student_quantized:
        _leaf_hints(list(options.hints), student, where, "student")
    teacher = load_teacher(options, ctx, where, dry_run=True)
    n = teacher_stage(options.teacher)
    if quant.is_quantized(teacher) or (n is not None and _quantized_by(n, ctx)):
        _leaf_hints(list(options.hints.values()), teacher, where, "teacher")
    distiller = make_distiller(options, student, ctx, where, teacher=teacher)
    try:
        train = ctx.splits.loader("train", needed_by=where)
        if options.cache:
            outputs = distiller.teacher_outputs(move_inputs(ctx.example_input, ctx.device))
            check_budget(len(train.dataset), outputs, options.cache_max_mb, where)  # type: ignore[arg-type]
    finally:
        distiller.close()

