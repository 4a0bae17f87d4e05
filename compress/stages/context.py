"""What a stage receives (:class:`StageContext`) and returns (:class:`StageResult`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from compress import metrics
from compress.data import build_loader
from compress.errors import DataError
from compress.recipe import DataSection, Recipe, StageSpec


class Splits:
    """The recipe's data splits, each built once on first use."""

    def __init__(self, section: DataSection, seed: int = 0, where: Callable[[str], str] | None = None) -> None:
        self.section, self.seed = section, seed
        self.where = where or (lambda split: f"data.{split}")
        self._loaders: dict[str, DataLoader] = {}

    def has(self, split: str) -> bool:
        return getattr(self.section, split) is not None

    def loader(self, split: str, *, needed_by: str = "this recipe") -> DataLoader:
        """The loader for ``train``, ``calibration`` or ``eval``.

        Raises:
            DataError: the split is not in the recipe, or its data is unusable.
        """
        if split not in self._loaders:
            spec = getattr(self.section, split)
            if spec is None:
                raise DataError(f"{needed_by} needs data.{split}, which the recipe does not define")
            self._loaders[split] = build_loader(spec, self.where(split), train=split == "train", seed=self.seed)
        return self._loaders[split]


@dataclass
class StageContext:
    """Everything a stage may use; stages write files only under ``stage_dir`` (or via the result)."""

    recipe: Recipe
    spec: StageSpec
    run_dir: Path
    stage_dir: Path
    splits: Splits
    device: torch.device
    baseline: nn.Module
    baseline_outputs: metrics.Outputs
    example_input: torch.Tensor
    progress: bool = True
    input_outputs: metrics.Outputs | None = None  # the stage's input model on the eval split, when known

    @property
    def metric(self) -> str:
        return self.recipe.body.metric

    @property
    def where(self) -> str:
        """The recipe location of this stage, for error messages: ``recipe.yaml:12 stages.2.train``."""
        return self.recipe.locate("stages", self.spec.index, self.spec.type)

    def outputs(self, model: nn.Module) -> metrics.Outputs:
        """``model`` on the eval split."""
        return metrics.collect(model, self.splits.loader("eval"))

    def input_model_outputs(self, model: nn.Module) -> metrics.Outputs:
        """The stage's unchanged input model on the eval split, reusing the pipeline's last pass."""
        return self.input_outputs if self.input_outputs is not None else self.outputs(model)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """The recipe metric (first) and fidelity vs the baseline on the eval split."""
        return metrics.score(self.metric, self.outputs(model), self.baseline_outputs)

    def score(self, model: nn.Module) -> float:
        """The recipe metric alone (higher is better): what fine-tunes keep the best epoch by."""
        return self.evaluate(model)[self.metric]


@dataclass
class StageResult:
    """A stage's output.

    Attributes:
        model: the (possibly new) model handed to the next stage.
        info: stage-specific figures for its report entry (e.g. fine-tune history).
        report: top-level report.json sections (``export``, ``engine``, ``check``).
        passed: False when a check failed (the run then exits with code 1).
        warnings: one line each for what the user should know but that does not fail the run; the
            pipeline prints them and keeps them in the stage's report entry (``warnings``).
    """

    model: nn.Module
    info: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    passed: bool = True
    warnings: list[str] = field(default_factory=list)
