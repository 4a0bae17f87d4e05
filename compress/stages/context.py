"""What a stage receives (:class:`StageContext`) and returns (:class:`StageResult`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from compress import metrics, structure
from compress.data import build_dataset, build_loader
from compress.data_config import DataSection, Holdout
from compress.errors import DataError
from compress.holdout import cheap_labels, holdout_indices
from compress.stages.spec import RecipeView, StageSpec


class Splits:
    """The recipe's data splits, each built once on first use.

    ``data.val: {holdout: F}`` builds ``train`` and ``val`` together: the held-out samples are
    removed from ``train`` (see :mod:`compress.holdout`).
    """

    def __init__(self, section: DataSection, seed: int = 0, where: Callable[[str], str] | None = None) -> None:
        self.section, self.seed = section, seed
        self.where = where or (lambda split: f"data.{split}")
        self._loaders: dict[str, DataLoader] = {}

    @property
    def holdout(self) -> Holdout | None:
        """The ``{holdout: F}`` form of ``data.val``, if the recipe uses it."""
        return self.section.val if isinstance(self.section.val, Holdout) else None

    def has(self, split: str) -> bool:
        return getattr(self.section, split) is not None

    def origin(self, split: str) -> str:
        """Where a split's samples come from, for the plan and the report: ``digits``, ``holdout 0.1 of data.train``."""
        if split == "val" and self.holdout is not None:
            return f"holdout {self.holdout.holdout} of data.train (seed {self.seed})"
        spec = getattr(self.section, split)
        return "none" if spec is None else spec.source

    def loader(self, split: str, *, needed_by: str = "this recipe") -> DataLoader:
        """The loader for ``train``, ``val``, ``calibration`` or ``eval``.

        Raises:
            DataError: the split is not in the recipe, or its data is unusable.
        """
        if split not in self._loaders:
            spec = getattr(self.section, split)
            if spec is None:
                raise DataError(f"{needed_by} needs data.{split}, which the recipe does not define")
            if split in ("train", "val") and self.holdout is not None:
                self._hold_out(self.holdout.holdout)
            else:
                self._loaders[split] = build_loader(spec, self.where(split), train=split == "train", seed=self.seed)
        return self._loaders[split]

    def _hold_out(self, fraction: float) -> None:
        train = self.section.train
        if train is None:
            raise DataError(f"{self.where('val')}: holdout takes a part of data.train, which the recipe does not define")
        dataset = build_dataset(train, self.where("train"))
        try:
            kept, held = holdout_indices(len(dataset), fraction, self.seed, cheap_labels(dataset))  # type: ignore[arg-type]
        except DataError as exc:
            raise DataError(f"{self.where('val')}: {exc}") from None
        self._loaders["train"] = build_loader(
            train, self.where("train"), train=True, seed=self.seed, dataset=Subset(dataset, kept)
        )
        self._loaders["val"] = build_loader(
            train.model_copy(update={"shuffle": False}), self.where("val"), seed=self.seed, dataset=Subset(dataset, held)
        )


def recipe_factories(recipe: RecipeView, model: nn.Module | None = None) -> list[str]:
    """The exact model factories the user named: the recipe's ``model.factory`` and every teacher's and
    student's ``factory``, plus ``model``'s (the input model, whose factory ``prepare`` let in). Checkpoints
    of the run (stage checkpoints, ``stage N`` teachers, ``--resume``) may name these; whole modules only
    through ``model.trust``."""
    found: list[str] = []

    def walk(node: Any, key: str = "") -> None:
        if isinstance(node, dict):
            if key in ("model", "teacher", "student") and isinstance(node.get("factory"), str):
                found.append(node["factory"])
            for k, value in node.items():
                walk(value, str(k))
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(recipe.resolved())
    origin = structure.origin_of(model) if model is not None else None
    if origin is not None and origin.factory:
        found.append(origin.factory)
    return sorted(set(found))


@dataclass
class StageContext:
    """Everything a stage may use; stages write files only under ``stage_dir`` (or via the result)."""

    recipe: RecipeView
    spec: StageSpec
    run_dir: Path
    stage_dir: Path
    splits: Splits
    device: torch.device
    baseline: nn.Module
    baseline_outputs: metrics.Outputs
    example_input: Any  # compress.inputs.Inputs: a tensor, a tuple or a dict of tensors
    progress: bool = True
    input_outputs: metrics.Outputs | None = None  # the stage's input model on the eval split, when known
    _val_reference: metrics.Outputs | None = field(default=None, init=False, repr=False)  # baseline on data.val

    @property
    def metric(self) -> str:
        return self.recipe.body.metric.name

    @property
    def metric_output(self) -> str | None:
        """The model output the recipe's metric names (None: the default rule of :mod:`compress.outputs`)."""
        return self.recipe.body.metric.output

    @property
    def trust(self) -> list[str]:
        """Modules whose factories checkpoints this run loads may name: the recipe's ``model.trust``."""
        return list(self.recipe.body.model.trust)

    @property
    def factories(self) -> list[str]:
        """Factories the user named, which checkpoints of this run may name (:func:`recipe_factories`)."""
        return recipe_factories(self.recipe, self.baseline)

    @property
    def where(self) -> str:
        """The recipe location of this stage, for error messages: ``recipe.yaml:12 stages.2.train``."""
        return self.recipe.locate("stages", self.spec.index, self.spec.type)

    def outputs(self, model: nn.Module) -> metrics.Outputs:
        """``model`` on the eval split."""
        return metrics.collect(model, self.splits.loader("eval"), output=self.metric_output)

    def input_model_outputs(self, model: nn.Module) -> metrics.Outputs:
        """The stage's unchanged input model on the eval split, reusing the pipeline's last pass."""
        return self.input_outputs if self.input_outputs is not None else self.outputs(model)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """The recipe metric (first) and fidelity vs the baseline on the eval split."""
        return metrics.score(self.metric, self.outputs(model), self.baseline_outputs)

    def score(self, model: nn.Module) -> float:
        """The recipe metric alone on the eval split: a figure to report, never to select by (see :meth:`val_score`)."""
        return self.evaluate(model)[self.metric]

    def val_score(self, model: nn.Module) -> float:
        """The recipe metric on ``data.val`` (higher is better): what keep_best, and any search or
        threshold tuning, selects by. Label-free metrics compare with the baseline on the same split.

        Raises:
            DataError: the recipe has no ``data.val``.
        """
        loader = self.splits.loader("val", needed_by=f"{self.where} (selecting on data.val)")
        reference = None
        if self.metric in metrics.LABEL_FREE:
            if self._val_reference is None:
                self._val_reference = metrics.collect(self.baseline, loader, output=self.metric_output)
            reference = self._val_reference
        outputs = metrics.collect(model, loader, output=self.metric_output)
        return metrics.score(self.metric, outputs, reference)[self.metric]


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
