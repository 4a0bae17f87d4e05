"""Recipes the stage tests write: a digits checkpoint, the three splits, the stages under test."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

RECIPE = """\
name: {name}
model:
  checkpoint: {checkpoint}
data:
  train: {{source: digits, split: train, batch_size: 64}}
{val}  calibration: {{source: digits, split: train, limit: 256}}
  eval: {{source: digits, split: test, batch_size: 256}}
{metric}stages:
{stages}
"""

EXPORT = """\
  - export:
      onnx: {{target: {target}}}
      engine: {{batch_sizes: [1], bench_iters: 2}}
      check: {{max_drop: 1.0, min_agreement: {min_agreement}}}
"""


def recipe_text(checkpoint: Path, stages: str, *, val: str = "", metric: str | None = None, name: str = "s") -> str:
    """The recipe: ``stages`` (YAML list items, two-space indent); ``val`` a whole ``  val: ...`` line (with its
    newline) or nothing; ``metric`` the recipe metric's name (default: the recipe's own default)."""
    return RECIPE.format(name=name, checkpoint=checkpoint, stages=stages, val=val,
                         metric=f"metric: {metric}\n" if metric is not None else "")


def stage_recipe(write_recipe: Callable[..., Path], checkpoint: Path, stages: str, target: str | None = "onnxruntime",
                 min_agreement: float = 0.99) -> Path:
    """Write the recipe: ``stages`` (YAML list items, two-space indent), then an export stage unless ``target`` is None."""
    export = EXPORT.format(target=target, min_agreement=min_agreement) if target else ""
    return write_recipe(recipe_text(checkpoint, stages + export))


def read_report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())
