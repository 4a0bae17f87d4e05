"""Registry of stage types: the only way the pipeline and the recipe schema know about stages.

A stage module registers itself with :func:`register`. ``compress.recipe`` (the layer above the
stages) imports ``compress.stages.builtin``, which imports every built-in stage module, so the
registry is complete whenever a recipe can be read; the registry itself imports no stage.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from torch import nn

    from compress.stages.context import StageContext, StageResult

RunFn = Callable[["nn.Module", Any, "StageContext"], "StageResult"]
CheckFn = Callable[["nn.Module", Any, "StageContext"], "str | None"]
DryRunFn = Callable[["nn.Module", Any, "StageContext"], "nn.Module"]


class Effect(enum.Flag):
    """What a stage does to the model, as later stages need to know (``compress.stages.order`` asks)."""

    NONE = 0
    QUANTIZES = enum.auto()  # the model leaves with quantizers
    SPARSIFIES = enum.auto()  # the model leaves with 2:4 masks
    RESHAPES = enum.auto()  # weight shapes change (channel pruning); the stage offers a dry run
    NEW_MODEL = enum.auto()  # the stage replaces the model with another (a distill student)


EffectsFn = Callable[[Any], Effect]
# config -> (the deployment target the stage builds for, the option keys that set it)
DeployTargetFn = Callable[[Any], "tuple[Any, tuple[str, ...]]"]


@dataclass(frozen=True)
class StageType:
    """One kind of stage: its config schema, how to run it, and an optional dry-run check.

    Attributes:
        name: the key used in recipes (``- train: {...}``).
        config: pydantic model for the stage's options (unknown keys rejected).
        run: ``(model, config, ctx) -> StageResult``; must not modify files outside ``ctx.stage_dir``
            except through the result.
        check: ``(model, config, ctx) -> None | str``; called by ``compress validate`` to resolve layer
            names/patterns without training; raises ``CompressError``. A returned line (e.g. an
            estimate) is printed under the stage in the plan.
        changes_model: False for stages (export) whose output is files, not a new model.
        effects: ``config -> Effect``: what the stage does to the model with these options.
        dry_run: ``(model, config, ctx) -> model`` with the shapes the stage would give, without
            training (RESHAPES stages); later stages judge their options on it.
        deploy_target: ``config -> (target, keys)`` for a stage that deploys for a target (export);
            quantizing stages before it place their quantizers for that target.
    """

    name: str
    config: type[BaseModel]
    run: RunFn
    check: CheckFn | None = None
    changes_model: bool = True
    effects: EffectsFn = lambda _config: Effect.NONE
    dry_run: DryRunFn | None = None
    deploy_target: DeployTargetFn | None = None


_REGISTRY: dict[str, StageType] = {}


def register(
    name: str,
    config: type[BaseModel],
    *,
    check: CheckFn | None = None,
    changes_model: bool = True,
    effects: Effect | EffectsFn = Effect.NONE,
    dry_run: DryRunFn | None = None,
    deploy_target: DeployTargetFn | None = None,
) -> Callable[[RunFn], RunFn]:
    """Decorator registering ``run`` as the implementation of stage type ``name``.

    ``effects`` is an :class:`Effect` or, when it depends on the options, ``config -> Effect``.
    """
    effects_fn: EffectsFn = effects if callable(effects) and not isinstance(effects, Effect) else (lambda _c: effects)

    def deco(run: RunFn) -> RunFn:
        if name in _REGISTRY:
            raise RuntimeError(f"stage type '{name}' registered twice")
        _REGISTRY[name] = StageType(name, config, run, check, changes_model, effects_fn, dry_run, deploy_target)
        return run

    return deco


def stage_types() -> dict[str, StageType]:
    """All registered stage types (the built-ins are registered once ``compress`` is imported)."""
    return dict(_REGISTRY)
