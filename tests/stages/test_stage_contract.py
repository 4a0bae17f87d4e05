"""The stage contract, run for every registered stage type, calibrator and channel importance, and a new
stage type added from outside the package (no edit to any other stage).

Contract for a stage that changes the model: the run exits 0, the stage writes ``metrics.json`` and a
checkpoint, and that checkpoint reloads to a model that scores exactly what the stage recorded (the
same weights, the same eval split, the same arithmetic: 0 samples apart). A file-producing stage
(export) writes its files and a passing check.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pydantic import Field
from torch import nn

import compress
from compress import metrics
from compress.config import Strict
from compress.data import build_loader
from compress.data_config import DigitsData
from compress.prune.channel import Importance
from compress.ptq.calibrators import Method
from compress.stages import registry
from compress.stages.context import StageContext, StageResult
from compress.stages.registry import Effect, register, stage_types

RECIPE = """\
name: contract
model:
  checkpoint: {checkpoint}
data:
  train: {{source: digits, split: train, batch_size: 64, limit: 256}}
  calibration: {{source: digits, split: train, limit: 128}}
  eval: {{source: digits, split: test, batch_size: 256}}
stages:
{stages}
"""

# One short entry per registered stage type; a stage type without one fails test_every_stage_type_has_an_entry.
STAGES = {
    "train": "  - train: {finetune: {epochs: 1, lr: 0.01}}",
    "prune": "  - prune: {method: channel, ratio: 0.25, finetune: {epochs: 0}}",
    "distill": "  - distill: {teacher: baseline, finetune: {epochs: 1, lr: 0.01}}",
    "sparsity": "  - sparsity: {finetune: {epochs: 0}}",
    "ptq": "  - ptq: {calibrator: max, limit: 128}",
    "qat": "  - qat: {calibrator: max, limit: 128, finetune: {epochs: 1, lr: 0.001}}",
    "export": "  - export: {onnx: {target: onnxruntime}, engine: {batch_sizes: [1], bench_iters: 0}, "
              "check: {max_drop: 5.0}}",
}


def _eval_top1(model: nn.Module) -> float:
    loader = build_loader(DigitsData(source="digits", split="test", batch_size=256), "eval")
    return metrics.score("top1", metrics.collect(model.eval(), loader))["top1"]


def _run(cli, write_recipe, checkpoint: Path, stages: str, out: Path) -> dict:
    recipe = write_recipe(RECIPE.format(checkpoint=checkpoint, stages=stages))
    result = cli("run", recipe, "--out", out)
    assert result.code == 0, result.err
    return json.loads((out / "report.json").read_text())


def _check_stage(out: Path, index: int, kind: str) -> None:
    stage_dir = out / "stages" / f"{index + 1:02d}-{kind}"
    record = json.loads((stage_dir / "metrics.json").read_text())
    assert record["type"] == kind
    if stage_types()[kind].changes_model:
        reloaded = compress.load(stage_dir / "checkpoint.pt")
        # the same weights on the same split: 0 samples apart
        assert _eval_top1(reloaded) == pytest.approx(record["metrics"]["top1"], abs=1e-9)
    else:
        assert record["passed"] is True


def test_every_stage_type_has_an_entry() -> None:
    assert set(STAGES) == set(stage_types()), "add the new stage type to STAGES"


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(STAGES))
def test_every_stage_type_keeps_the_contract(kind: str, cli, write_recipe, digits_cnn_checkpoint, tmp_path) -> None:
    before = {"sparsity": [], "ptq": [], "qat": [], "export": []}.get(kind, [])
    stages = "\n".join([*(STAGES[k] for k in before), STAGES[kind]])
    _run(cli, write_recipe, digits_cnn_checkpoint, stages, tmp_path / "run")
    _check_stage(tmp_path / "run", len(before), kind)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(Method))
def test_every_calibrator_keeps_the_contract(method: Method, cli, write_recipe, digits_cnn_checkpoint, tmp_path) -> None:
    report = _run(cli, write_recipe, digits_cnn_checkpoint, f"  - ptq: {{calibrator: {method.value}, limit: 128}}",
                  tmp_path / "run")
    _check_stage(tmp_path / "run", 0, "ptq")
    # a calibrated INT8 digits CNN stays within 5 points (18 of 360 samples) of its float self
    assert report["stages"][0]["metrics"]["top1"] >= report["baseline"]["metrics"]["top1"] - 5.0


@pytest.mark.slow
@pytest.mark.parametrize("importance", list(Importance))
def test_every_channel_importance_keeps_the_contract(importance: Importance, cli, write_recipe, digits_cnn_checkpoint,
                                                     tmp_path) -> None:
    stages = f"  - prune: {{method: channel, ratio: 0.25, importance: {importance.value}, finetune: {{epochs: 0}}}}"
    report = _run(cli, write_recipe, digits_cnn_checkpoint, stages, tmp_path / "run")
    _check_stage(tmp_path / "run", 0, "prune")
    assert report["stages"][0]["params"] < report["baseline"]["params"]  # channels really went


# ---------------------------------------------------------------------------------------------------
# A stage type added from outside: one module registers it; no other stage, the recipe or the pipeline changes.


class RoundConfig(Strict):
    decimals: int = Field(default=2, ge=0, le=8)


def _round_weights(model: nn.Module, config: RoundConfig, ctx: StageContext) -> StageResult:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.round(p, decimals=config.decimals))
    return StageResult(model, info={"rounded": sum(p.numel() for p in model.parameters())})


@pytest.fixture
def round_stage() -> Iterator[str]:
    register("round_weights", RoundConfig, effects=Effect.NONE)(_round_weights)
    try:
        yield "round_weights"
    finally:
        registry._REGISTRY.pop("round_weights")  # leave the registry as the other tests expect it


def test_a_stage_registered_outside_the_package_runs_from_a_recipe(round_stage, cli, write_recipe,
                                                                    digits_cnn_checkpoint, tmp_path) -> None:
    stages = f"  - {round_stage}: {{decimals: 1}}"
    recipe = write_recipe(RECIPE.format(checkpoint=digits_cnn_checkpoint, stages=stages))
    assert cli("validate", recipe).code == 0
    out = tmp_path / "run"
    assert cli("run", recipe, "--out", out).code == 0
    _check_stage(out, 0, round_stage)
    model = compress.load(out / "stages" / f"01-{round_stage}" / "checkpoint.pt")
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(weights, torch.round(weights, decimals=1))  # the stage's effect is in its checkpoint
    bad = write_recipe(RECIPE.format(checkpoint=digits_cnn_checkpoint, stages=f"  - {round_stage}: {{decimals: 9}}"))
    assert "round_weights.decimals" in cli("validate", bad).error_line()  # its typed options, checked like any stage's
