"""``compress sensitivity RECIPE``: the per-unit table on data.val, nothing written; bad input in one line."""

from __future__ import annotations

import json

import pytest
from helpers_budget import SENSITIVE, outlier_checkpoint, sensitive_model
from helpers_recipes import recipe_text

import compress

PTQ = "  - ptq: {calibrator: max, target: tensorrt}\n"


@pytest.fixture(scope="module")
def checkpoint(digits_cnn_checkpoint, tmp_path_factory):
    return outlier_checkpoint(digits_cnn_checkpoint, tmp_path_factory.mktemp("outlier") / "model.pt")


def _recipe(write_recipe, checkpoint, val="  val: {holdout: 0.2}\n", stages=PTQ):
    return write_recipe(recipe_text(checkpoint, stages, val=val, name="sens"))


def test_sensitivity_prints_the_table_and_writes_nothing(cli, write_recipe, checkpoint, tmp_path, snapshot_tree):
    recipe = _recipe(write_recipe, checkpoint)
    before = snapshot_tree(tmp_path)
    result = cli("sensitivity", recipe, "--quiet", "--json")
    assert result.code == 0, result.err
    table = json.loads(result.out)
    assert table["what"] == "sens: stage 1 ptq on the input model, top1 on data.val (287 samples)"
    assert table["passes"] == 20 and len(table["layers"]) == 9
    top = max(table["layers"], key=lambda r: r["recovery_alone"])
    assert top["name"] == SENSITIVE and top["recovery_alone"] > 50
    text = cli("sensitivity", recipe)
    assert text.code == 0
    assert text.out.splitlines()[3].startswith(SENSITIVE)  # ranked: most recovery first
    assert "20 forward passes" in text.err  # the cost, stated before the first pass
    assert snapshot_tree(tmp_path) == before


@pytest.mark.parametrize("val, stages, message", [
    ("", PTQ, "stages.0.ptq (sensitivity, measured on data.val) needs data.val"),
    ("  val: {holdout: 0.2}\n", "  - train: {finetune: {epochs: 1}}\n",
     "no ptq or qat stage and the model is not quantized"),
])
def test_sensitivity_bad_input_is_one_line(cli, write_recipe, checkpoint, val, stages, message):
    line = cli("sensitivity", _recipe(write_recipe, checkpoint, val=val, stages=stages)).error_line()
    assert message in line


def test_sensitivity_of_a_quantized_checkpoint_as_it_is(cli, write_recipe, digits_cnn_checkpoint, tmp_path):
    path = tmp_path / "int8.pt"
    qmodel = sensitive_model(digits_cnn_checkpoint)
    compress.quant.keep_float(qmodel, ["fc"])  # already float: not a unit any more
    compress.save(qmodel, path)
    result = cli("sensitivity", _recipe(write_recipe, path, stages="  []\n"), "--quiet", "--json")
    assert result.code == 0, result.err
    table = json.loads(result.out)
    assert table["what"] == "sens: the input model as quantized, top1 on data.val (287 samples)"
    names = [r["name"] for r in table["layers"]]
    assert "fc" not in names and len(names) == 8
    assert max(table["layers"], key=lambda r: r["recovery_alone"])["name"] == SENSITIVE
