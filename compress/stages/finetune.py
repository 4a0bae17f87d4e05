"""Fine-tuning as stages do it: the shared loop with the stage's seed, split and distill block.

Stage infrastructure: every stage type with a ``finetune`` section uses it; no stage imports another.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from compress.data import split_batch
from compress.distill.options import DistillOptions
from compress.errors import DataError
from compress.stages.context import StageContext
from compress.stages.order import quantized_before
from compress.train import Callback, FinetuneConfig, finetune

if TYPE_CHECKING:
    from compress.distill import Distiller


class StageFinetune(FinetuneConfig):
    """A stage's ``finetune`` section: the core loop's options plus the recipe-only ``distill`` block, which
    names a teacher the stage resolves (``baseline``, ``stage N``, a model spec)."""

    distill: DistillOptions | None = None  # teacher-student loss during this fine-tune


def check_finetune(model: nn.Module, config: Any, ctx: StageContext) -> None:
    """Dry-run a stage's ``finetune.distill`` block (any stage type with a ``finetune``), and check that
    data.train has the labels the fine-tune's task loss needs."""
    cfg = getattr(config, "finetune", None)
    if isinstance(cfg, FinetuneConfig) and cfg.epochs and ctx.splits.has("train"):
        kd = config if isinstance(config, DistillOptions) else getattr(cfg, "distill", None)
        if (kd is None or kd.task_weight > 0) and split_batch(next(iter(ctx.splits.loader("train"))))[1] is None:
            fix = "set label_free: true" if kd is not None else "add labels, or fine-tune with distill: {label_free: true}"
            raise DataError(f"{ctx.where}.finetune: the task loss needs labels, but data.train has none; {fix}")
    if isinstance(cfg, StageFinetune) and cfg.distill is not None and cfg.epochs:
        from compress.stages.teacher import check_distill

        quantized = quantized_before(model, ctx, including_this=True)
        check_distill(cfg.distill, model, ctx, f"{ctx.where}.finetune.distill", student_quantized=quantized)


def core_options(cfg: FinetuneConfig) -> dict[str, Any]:
    """The options of ``cfg`` the core loop takes (a stage section's recipe-only fields dropped)."""
    return {name: getattr(cfg, name) for name in FinetuneConfig.model_fields}


def keep_best_status(cfg: FinetuneConfig, has_val: bool) -> str:
    """What ``keep_best`` does in a fine-tune, and why, for the report: ``off: no data.val split``."""
    if not cfg.keep_best:
        return "off: keep_best: false"
    return "on: best epoch on data.val" if has_val else "off: no data.val split"


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
        from compress.stages.teacher import make_distiller

        owned = distiller = make_distiller(cfg.distill, model, ctx, f"{ctx.where}.finetune.distill")
    if distiller is not None:
        callbacks = [*callbacks, distiller.callback()]
    has_val = ctx.splits.has("val")
    try:
        result = finetune(
            model,
            ctx.splits.loader("train", needed_by=ctx.where),
            FinetuneConfig(**{**core_options(cfg), "keep_best": cfg.keep_best and has_val}),
            evaluate=ctx.val_score if has_val else None,  # never data.eval: it is only reported on
            callbacks=callbacks,
            device=ctx.device,
            progress=ctx.progress,
            desc=ctx.spec.dirname,
            reshard=True,  # seeded global batches: DDP equals one process, distillation caches key on indices
            output=ctx.metric_output,
        )
    finally:
        if owned is not None:
            owned.close()
    # each epoch's score is on data.val: named so, lest a reader take it for an eval figure
    history = [{(f"val_{ctx.metric}" if k == "score" else k): v for k, v in h.items()} for h in result.history]
    info: dict[str, Any] = {"history": history, "best_epoch": result.best_epoch,
                            "keep_best": keep_best_status(cfg, has_val)}
    if owned is not None:
        info["distill"] = owned.report(cfg.distill.describe_teacher())  # type: ignore[union-attr]
    return info
