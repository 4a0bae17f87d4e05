"""Questions a stage asks about the stages before it, answered from the effects each stage type
declares (:class:`compress.stages.registry.Effect`), never from stage type names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from torch import nn

from compress import quant
from compress.errors import CompressError
from compress.sparsity import is_sparse
from compress.stages.context import StageContext
from compress.stages.registry import Effect, stage_types
from compress.stages.spec import StageSpec


def effects(spec: StageSpec) -> Effect:
    """What stage ``spec`` does to the model, as its stage type declares for these options."""
    return stage_types()[spec.type].effects(spec.config)


def quantizes_within(stages: Sequence[StageSpec]) -> bool:
    """Whether any of ``stages`` quantizes the model."""
    return any(Effect.QUANTIZES in effects(s) for s in stages)


def quantized_before(model: nn.Module, ctx: StageContext, *, including_this: bool = False) -> bool:
    """The stage receives a quantized model: the recipe's model is, or an earlier stage quantizes.

    ``including_this``: also when this stage itself quantizes (a QAT fine-tune trains quantized).
    """
    upto = ctx.spec.index + 1 if including_this else ctx.spec.index
    return quant.is_quantized(model) or quantizes_within(ctx.recipe.stages[:upto])


def sparse_before(model: nn.Module, ctx: StageContext) -> str | None:
    """Where the model became 2:4 sparse before this stage (its checkpoint or an earlier stage), or None.

    A stage that replaces the model (a distill ``student``) starts from a dense one.
    """
    found = "the input model (its checkpoint carries 2:4 masks)" if is_sparse(model) else None
    for spec in ctx.recipe.stages[: ctx.spec.index]:
        done = effects(spec)
        if Effect.SPARSIFIES in done:
            found = ctx.recipe.locate("stages", spec.index, spec.type)
        elif Effect.NEW_MODEL in done:
            found = None
    return found


def refuse_after_sparsity(model: nn.Module, ctx: StageContext, what: str) -> None:
    """Stages that change weight shapes call this in their check.

    Raises:
        CompressError: the model is 2:4 sparse by then.
    """
    earlier = sparse_before(model, ctx)
    if earlier is not None:
        raise CompressError(f"{ctx.where}: {what} cannot follow sparsity ({earlier}): it would break the 2:4 masks; "
                            f"put it before the sparsity stage")


def shaped(model: nn.Module, ctx: StageContext) -> tuple[nn.Module, str]:
    """The model with the shapes it will have at this stage, as far as earlier stages' dry runs tell,
    and how it was judged."""
    judged = "the input model"
    registry = stage_types()
    for spec in ctx.recipe.stages[: ctx.spec.index]:
        stage = registry[spec.type]
        done = stage.effects(spec.config)
        if Effect.RESHAPES in done and stage.dry_run is not None:
            model = stage.dry_run(model, spec.config, replace(ctx, spec=spec))
            judged = f"the model after stage {spec.index + 1}'s dry run"
        elif Effect.NEW_MODEL in done:
            return model, f"the input model, not stage {spec.index + 1}'s new student"
    return model, judged
