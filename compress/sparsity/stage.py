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
from typing import Any

from pydantic import Field, field_validator
from torch import nn

from compress.config import Strict
from compress.errors import CompressError
from compress.inputs import move_inputs
from compress.sparsity.masks import Sparsifier, apply_2to4, plan
from compress.sparsity.pattern import PATTERN
from compress.sparsity.verify import verify_model
from compress.stages.context import StageContext, StageResult
from compress.stages.finetune import StageFinetune, stage_finetune
from compress.stages.order import quantized_before, shaped, sparse_before
from compress.stages.registry import Effect, register


class SparsityConfig(Strict):
    pattern: str = PATTERN
    permute: bool = True  # reorder channels (through their producers) so the masks keep more magnitude
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    finetune: StageFinetune = Field(default_factory=lambda: StageFinetune(epochs=2))

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        if value != PATTERN:
            raise ValueError(f"'{value}' is not supported; only '{PATTERN}' (the pattern sparse tensor cores run)")
        return value


def _check(model: nn.Module, config: SparsityConfig, ctx: StageContext) -> str:
    if quantized_before(model, ctx):
        raise CompressError(f"{ctx.where}: sparsity must come before quantization (ptq/qat): the quantizers' "
                            "ranges would not match the masked weights")
    earlier = sparse_before(model, ctx)
    if earlier is not None:
        raise CompressError(f"{ctx.where}: the model is already 2:4 sparse ({earlier})")
    reshaped, judged = shaped(model, ctx)
    survey = Sparsifier(reshaped)
    try:
        plan(reshaped, ctx.example_input, config.include, config.exclude, ctx.where, survey)
    except CompressError as exc:
        raise CompressError(f"{exc}" + (f" (judged on {judged}; channel pruning with round_to: 16 keeps counts "
                                         "sparse kernels take)" if reshaped is not model else "")) from None
    if config.permute:  # the dependency tracer must follow the model; on a copy, nothing changes
        from compress.prune import graph

        probe = copy.deepcopy(model)
        try:
            graph.trace(probe, move_inputs(ctx.example_input, next(probe.parameters()).device), ctx.where)
        except CompressError as exc:
            raise CompressError(f"{exc}; set permute: false to sparsify without reordering channels") from None
    if config.finetune.epochs:
        ctx.splits.loader("train", needed_by=ctx.where)
    est = survey.estimate
    earlier = judged != "the input model" or reshaped is not model  # an earlier stage reshaped or replaced it
    weightless = est.get("weightless_macs_share", 0.0)
    return (f"2:4 on {est['eligible_layers']} layers, {est['eligible_macs_share']:.0%} of the MACs: best case "
            f"{est['best_case_speedup']:.2f}x" + (f" (estimated on {judged})" if earlier else "")
            + (f"; {weightless:.0%} of the MACs multiply activations (attention's Q·Kᵀ, A·V): always dense"
               if weightless >= 0.005 else "")
            + "".join(f"; {name} dense ({why})" for name, why in list(survey.skipped.items())[:6]))


@register("sparsity", SparsityConfig, check=_check, effects=Effect.SPARSIFIES)
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
