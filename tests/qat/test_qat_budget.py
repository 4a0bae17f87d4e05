"""``qat: {budget: ...}``: after the fine-tune, the units INT8 still costs most are kept float, as ``ptq.budget`` does,
measured against the float model the stage started from (the API side: tests/ptq/test_sensitivity.py).

The checkpoint is the trained digits CNN with an outlier channel (x100) planted in front of ``layer1.conv2``
(tests/helpers_budget.py): max-calibrated PTQ of it loses a few samples, which one epoch of QAT wins back, so the
budget is met by the all-INT8 model and nothing is floated or measured beyond it. (The x1000 outlier of the ptq
tests cannot be used here: its 1/1000-scaled weights take gradients 1000x too large, and one QAT epoch wrecks
them in float as well, which no float fallback can repair; the budget then reports it as not met.)
"""

from __future__ import annotations

import pytest
from helpers_budget import outlier_model
from helpers_recipes import EXPORT, read_report, recipe_text

import compress

QAT = ("  - qat: {calibrator: max, finetune: {epochs: 1, lr: 0.0001}, freeze_bn_after: 0, budget: {max_drop: 0.5}}\n"
       + EXPORT.format(target="onnxruntime", min_agreement=0.98))


@pytest.mark.slow
def test_a_qat_budget_is_measured_after_the_fine_tune_against_the_float_model(cli, write_recipe, tmp_path,
                                                                           digits_cnn_checkpoint) -> None:
    checkpoint = tmp_path / "outlier.pt"
    compress.save(outlier_model(digits_cnn_checkpoint, outlier=100.0), checkpoint)
    recipe = write_recipe(recipe_text(checkpoint, QAT, val="  val: {holdout: 0.2}\n", metric="top1"))
    checked = cli("validate", recipe)
    assert checked.code == 0, checked.err
    assert "budget (0.5 of data.val held out to confirm): all-INT8 first" in checked.out
    out = tmp_path / "run"
    result = cli("run", recipe, "--out", out, "--quiet")
    assert result.code == 0, result.err
    entry = read_report(out)["stages"][0]
    budget = entry["budget"]
    assert len(entry["finetune"]["history"]) == 1  # the search ran on the fine-tuned model
    assert budget["sensitivity"]["float"] > 0.95  # the float model's val top-1 (~99 %)
    # QAT won back what PTQ lost: the all-INT8 model meets it on both parts; 4 passes, no table
    assert budget["met"] and budget["float_units"] == [] and budget["passes"] == 4
    assert budget["drop"] <= 0.5 and budget["confirm_drop"] <= 0.5 and not budget["sensitivity"]["measured"]
    assert "## Accuracy budget" in (out / "report.md").read_text()


def test_a_qat_budget_without_val_is_a_one_line_error(cli, write_recipe, digits_cnn_checkpoint) -> None:
    result = cli("validate", write_recipe(recipe_text(digits_cnn_checkpoint, QAT, metric="top1")))
    assert result.code == 2
    assert "recipe.yaml:10 stages.0.qat.budget: needs data.val (a split, or {holdout: F}" in result.error_line()
