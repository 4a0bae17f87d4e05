"""One validated stage entry (:class:`StageSpec`) and what stages may read of the recipe (:class:`RecipeView`).

Stage code depends on these, never on ``compress.recipe``, which sits above the stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel


@dataclass(frozen=True)
class StageSpec:
    """One validated entry of ``stages``."""

    index: int
    type: str
    config: BaseModel

    @property
    def dirname(self) -> str:
        return f"{self.index + 1:02d}-{self.type}"

    def stage_dir(self, run_dir: Path) -> Path:
        """``DIR/stages/NN-TYPE``: the stage's checkpoint and metrics.json."""
        return run_dir / "stages" / self.dirname

    @property
    def checkpoint(self) -> str:
        """The stage's checkpoint, relative to the run directory (as report.json lists it)."""
        return f"stages/{self.dirname}/checkpoint.pt"

    def dump(self) -> dict[str, Any]:
        return {self.type: self.config.model_dump(mode="json")}


class RecipeView(Protocol):
    """The parts of a validated recipe a stage reads (``compress.recipe.Recipe`` provides them)."""

    @property
    def stages(self) -> tuple[StageSpec, ...]: ...

    @property
    def body(self) -> Any: ...  # the typed top level: seed, metric, model.trust, data

    @property
    def source(self) -> str: ...

    @property
    def name(self) -> str: ...

    def locate(self, *path: Any) -> str: ...

    def resolved(self) -> dict[str, Any]: ...
