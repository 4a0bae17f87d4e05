"""Registry of stage types: the only way the pipeline and the recipe schema know about stages.

A stage module registers itself with :func:`register`; ``compress.stages.builtin`` imports every
built-in stage module so that the registry is complete before a recipe is validated.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from torch import nn

    from compress.stages.context import StageContext, StageResult

RunFn = Callable[["nn.Module", Any, "StageContext"], "StageResult"]
CheckFn = Callable[["nn.Module", Any, "StageContext"], "str | None"]


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
    """

    name: str
    config: type[BaseModel]
    run: RunFn
    check: CheckFn | None = None
    changes_model: bool = True


_REGISTRY: dict[str, StageType] = {}


def register(
    name: str, config: type[BaseModel], *, check: CheckFn | None = None, changes_model: bool = True
) -> Callable[[RunFn], RunFn]:
    """Decorator registering ``run`` as the implementation of stage type ``name``."""

    def deco(run: RunFn) -> RunFn:
        if name in _REGISTRY:
            raise RuntimeError(f"stage type '{name}' registered twice")
        _REGISTRY[name] = StageType(name, config, run, check, changes_model)
        return run

    return deco


def stage_types() -> dict[str, StageType]:
    """All registered stage types, built-ins included."""
    importlib.import_module("compress.stages.builtin")
    return dict(_REGISTRY)
