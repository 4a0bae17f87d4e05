"""``sparsity``: 2:4 masks on the eligible Conv/Linear layers (channels permuted first), then a fine-tune.

The report's ``permutations`` lists what each channel group's search did, ``unpermuted`` each 2:4
layer no reordering reached (and why: a concatenation feeds it, ...), and ``permute_reason`` why
``permute: true`` reordered nothing, when it did not.

The masks are recorded on the model, so every later fine-tune (distill, qat) re-applies them and
the stage's checkpoint keeps them. Channel pruning after this stage is refused (it would break
the masks); quantization after it keeps the pattern (a zero weight quantizes to zero).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

from pydantic import Field, field_validator
from torch import nn

from compress.errors import CompressError
from compress.ptq.stage import quantized_before
from compress.recipe import Strict
from compress.sparsity.masks import Sparsifier, apply_2to4, is_sparse, plan
from compress.sparsity.pattern import PATTERN
from compress.sparsity.verify import verify_model
from compress.stages.context import StageContext, StageResult
from compress.stages.registry import register
from compress.stages.train import stage_finetune
from compress.train import FinetuneConfig


class SparsityConfig(Strict):
    pattern: str = PATTERN
    permute: bool = True  # reorder channels (through their producers) so the masks keep more magnitude
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    finetune: FinetuneConfig = Field(default_factory=lambda: FinetuneConfig(epochs=2))

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        if value != PATTERN:
            raise ValueError(f"'{value}' is not supported; only '{PATTERN}' (the pattern sparse tensor cores run)")
        return value


def sparse_before(model: nn.Module, ctx: StageContext) -> str | None:
    """Where the model became 2:4 sparse before this stage (its checkpoint or an earlier stage), or None.

    A ``distill`` stage with its own ``student`` replaces the model with a dense one.
    """
    found = "the input model (its checkpoint carries 2:4 masks)" if is_sparse(model) else None
    for spec in ctx.recipe.stages[: ctx.spec.index]:
        if spec.type == "sparsity":
            found = ctx.recipe.locate("stages", spec.index, spec.type)
        elif spec.type == "distill" and getattr(spec.config, "student", None) is not None:
            found = None
    return found


def _shaped(model: nn.Module, ctx: StageContext) -> tuple[nn.Module, str]:
    """The model with the shapes it will have at this stage, as far as dry runs tell, and how it was judged."""
    from compress.prune.stage import Method, dry_run

    judged = "the input model"
    for spec in ctx.recipe.stages[: ctx.spec.index]:
        config = spec.config
        if spec.type == "prune" and config.method is Method.channel:  # type: ignore[attr-defined]
            model = dry_run(model, config, replace(ctx, spec=spec))  # type: ignore[arg-type]
            judged = f"the model after stage {spec.index + 1}'s dry run"
        elif spec.type == "distill" and getattr(config, "student", None) is not None:
            return model, f"the input model, not stage {spec.index + 1}'s new student"
    return model, judged


def refuse_after_sparsity(model: nn.Module, ctx: StageContext, what: str) -> None:
    """Stages that change weight shapes call this in their check.

    Raises:
        CompressError: the model is 2:4 sparse by then.
    """
    earlier = sparse_before(model, ctx)
    if earlier is not None:
        raise CompressError(f"{ctx.where}: {what} cannot follow sparsity ({earlier}): it would break the 2:4 masks; "
                            f"put it before the sparsity stage")


def _check(model: nn.Module, config: SparsityConfig, ctx: StageContext) -> str:
    if quantized_before(model, ctx):
        raise CompressError(f"{ctx.where}: sparsity must come before quantization (ptq/qat): the quantizers' "
                            "ranges would not match the masked weights")
    earlier = sparse_before(model, ctx)
    if earlier is not None:
        raise CompressError(f"{ctx.where}: the model is already 2:4 sparse ({earlier})")
    shaped, judged = _shaped(model, ctx)
    survey = Sparsifier(shaped)
    try:
        plan(shaped, ctx.example_input, config.include, config.exclude, ctx.where, survey)
    except CompressError as exc:
        raise CompressError(f"{exc}" + (f" (judged on {judged}; channel pruning with round_to: 16 keeps counts "
                                         "sparse kernels take)" if shaped is not model else "")) from None
    if config.permute:  # the dependency tracer must follow the model; on a copy, nothing changes
        from compress.prune import graph

        probe = copy.deepcopy(model)
        try:
            graph.trace(probe, ctx.example_input.to(next(probe.parameters()).device), ctx.where)
        except CompressError as exc:
            raise CompressError(f"{exc}; set permute: false to sparsify without reordering channels") from None
    if config.finetune.epochs:
        ctx.splits.loader("train", needed_by=ctx.where)
    est = survey.estimate
    earlier = any(s.type in ("prune", "distill") for s in ctx.recipe.stages[: ctx.spec.index])
    weightless = est.get("weightless_macs_share", 0.0)
    return (f"2:4 on {est['eligible_layers']} layers, {est['eligible_macs_share']:.0%} of the MACs: best case "
            f"{est['best_case_speedup']:.2f}x" + (f" (estimated on {judged})" if earlier else "")
            + (f"; {weightless:.0%} of the MACs multiply activations (attention's Q·Kᵀ, A·V): always dense"
               if weightless >= 0.005 else "")
            + "".join(f"; {name} dense ({why})" for name, why in list(survey.skipped.items())[:6]))


@register("sparsity", SparsityConfig, check=_check)
def run_sparsity(model: nn.Module, config: SparsityConfig, ctx: StageContext) -> StageResult:
    sparsifier = apply_2to4(model, example_input=ctx.example_input, permute=config.permute,
                            include=config.include, exclude=config.exclude, where=ctx.where)
    info: dict[str, Any] = {"sparsity": {**sparsifier.report(), "permute": config.permute,
                                         "masked_metric": ctx.score(model)}}
    if config.finetune.epochs:
        info["finetune"] = stage_finetune(model, config.finetune, ctx)
    check = verify_model(model)
    broken = check.missing(list(sparsifier.layers))
    if broken:  # the loop re-applies the masks after every step; this would be a bug, never a silent one
        raise RuntimeError(f"{ctx.where}: layers {broken} lost their 2:4 pattern during the fine-tune")
    info["sparsity"]["sparse_layers"] = check.sparse_layers
    return StageResult(model, info=info)
