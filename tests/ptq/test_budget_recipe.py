"""``ptq: {budget: ...}`` from a recipe: measured on data.val, the float layer exported without Q/DQ, bad input refused.

The checkpoint is the trained digits CNN with an outlier channel planted in front of ``layer1.conv2``
(tests/helpers_budget.py): float top-1 unchanged, ~85 points lost when that layer's input is INT8.
"""

from __future__ import annotations

import pytest
from helpers_budget import SENSITIVE, outlier_checkpoint
from helpers_recipes import read_report, recipe_text

import compress
from compress import quant
from compress.export.coverage import locate
from compress.export.qdq import WEIGHTED_OPS, Graph

BUDGET = """\
  - ptq: {{calibrator: max, budget: {budget}}}
  - export:
      onnx: {{target: {target}}}
      engine: {{batch_sizes: [1], bench_iters: 2}}
      check: {{max_drop: 1.0, min_agreement: 0.99}}
"""
VAL = "  val: {holdout: 0.2}\n"


@pytest.fixture(scope="module")
def checkpoint(digits_cnn_checkpoint, tmp_path_factory):
    return outlier_checkpoint(digits_cnn_checkpoint, tmp_path_factory.mktemp("outlier") / "model.pt")


def _recipe(write_recipe, checkpoint, budget="{max_drop: 0.3}", val=VAL, target="onnxruntime", metric="top1"):
    return write_recipe(recipe_text(checkpoint, BUDGET.format(budget=budget, target=target), val=val, metric=metric,
                                             name="budget"))


def _dq_inputs(onnx_path, model, layer: str) -> list[bool]:
    """For the weighted node of ``layer``: whether its input and its weight come from a DequantizeLinear."""
    import onnx

    proto = onnx.load(str(onnx_path))
    graph = Graph(proto)
    for node in proto.graph.node:
        if node.op_type in WEIGHTED_OPS and locate(node, graph, model)[0] == layer:
            return [graph.producer.get(i) is not None and graph.producer[i].op_type == "DequantizeLinear"
                    for i in node.input[:2]]
    raise AssertionError(f"no weighted node of {layer}")


def test_budget_keeps_the_sensitive_layer_float_through_export(cli, write_recipe, checkpoint, tmp_path):
    recipe = _recipe(write_recipe, checkpoint, budget="{max_drop: 0.3, engine: true}")
    assert cli("validate", recipe).code == 0
    out = tmp_path / "run"
    result = cli("run", recipe, "--out", out, "--quiet")
    assert result.code == 0, result.err
    report = read_report(out)
    budget = report["stages"][0]["budget"]
    assert budget["split"] == "val" and budget["met"] and budget["float_units"] == [SENSITIVE]
    assert [s["float_units"] for s in budget["path"]] == [[], [SENSITIVE]]
    # the 287 held-out train digits: 144 to search, 143 (every other one) to confirm
    assert budget["path"][0]["drop"] > 50 and budget["drop"] <= 0.3 and budget["confirm_drop"] <= 0.3
    assert budget["search"] == {"samples": 144, "float": budget["sensitivity"]["float"], "drop": budget["drop"]}
    confirm = budget["confirm"]
    assert (confirm["share"], confirm["samples"], confirm["sample_pt"]) == (0.5, 143, round(100 / 143, 4))
    assert confirm["drop"] == budget["confirm_drop"] and confirm["engine_drop"] == budget["engine_drop"]
    assert "max_drop 0.3 pt is below one sample of the confirm part (0.6993 pt of 143 samples)" in confirm["warning"]
    # confirmed on the ONNX Runtime engine: only the step both parts said meets the budget
    assert budget["path"][0]["engine_drop"] is None and budget["engine_drop"] == budget["path"][1]["engine_drop"]
    units = len(budget["sensitivity"]["layers"])  # 14 for onnxruntime: 7 layers, 7 shared tensors
    # all-INT8 on both parts (4), the rest of the table on the search part, step 1 on both parts, 1 engine
    assert budget["engine_drop"] <= 0.3 and budget["passes"] == 4 + 2 * units + 2 + 1
    assert budget["sensitivity"]["measured"] and budget["sensitivity"]["samples"] == 144
    assert max(budget["sensitivity"]["layers"], key=lambda r: r["recovery_alone"])["name"] == SENSITIVE
    assert 0.5 < budget["int8_macs_share"] < 1  # layer1.conv2 is 28% of the MACs
    assert report["check"]["passed"]
    reasons = {f["layer"]: f["reason"] for f in report["engine"]["not_int8"]}
    assert reasons[SENSITIVE] == "kept_float" and SENSITIVE not in report["engine"]["int8_unplanned"]

    # the price of each step, timed: both step engines against the float model's, at batch 8 (the INT8 engine of
    # a CNN this small is not reliably faster, so only the figures' presence and sanity are asserted)
    latency = budget["latency"]
    assert [(t["step"], t["batch_size"]) for t in latency] == [(0, 8), (1, 8)]
    assert all(t["ms"] > 0 and t["float_ms"] > 0 and t["speedup"] > 0 for t in latency)

    md = (out / "report.md").read_text()
    assert "### 1. ptq: top1 within 0.3 pt of float on data.val: met" in md
    assert "confirm: 143 samples, 1 sample = 0.6993 pt." in md and "WARNING max_drop 0.3 pt is below one sample" in md
    assert f"| 1 (kept) | `{SENSITIVE}` |" in md and "x faster) |" in md
    assert "![accuracy budget](report_budget.png)" in md
    assert (out / "report_budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    model = compress.load(out / report["stages"][0]["checkpoint"])  # the stage checkpoint keeps the layer float
    assert quant.float_units(model) == [SENSITIVE]
    assert _dq_inputs(out / "model.onnx", model, SENSITIVE) == [False, False]
    assert _dq_inputs(out / "model.onnx", model, "layer1.conv1") == [True, True]

    # the search is saved after every step: a ptq stage run again (as --resume does after an interruption)
    # measures nothing it had measured
    (out / "stages/01-ptq/metrics.json").unlink()
    assert cli("run", recipe, "--out", out, "--resume", "--quiet").code == 0
    again = read_report(out)["stages"][0]["budget"]
    assert again["resumed"] and again["passes"] == 0 and again["path"] == budget["path"]


@pytest.mark.parametrize("budget, val, message", [
    ("{max_drop: -0.1}", VAL, "stages.0.ptq.budget.max_drop"),
    ("{max_drop: 101}", VAL, "stages.0.ptq.budget.max_drop"),
    ("{max_drop: 0.3, max_units: 0}", VAL, "stages.0.ptq.budget.max_units"),
    ("{max_drop: 0.3, metric: top5}", VAL, "stages.0.ptq.budget.metric"),
    ("{max_drop: 0.3, bogus: 1}", VAL, "stages.0.ptq.budget.bogus: unknown key 'bogus'"),
    ("{max_drop: 0.3}", "", "stages.0.ptq.budget: needs data.val"),
    ("{max_drop: 0.3, confirm: 1}", VAL, "stages.0.ptq.budget.confirm"),
    ("{max_drop: 0.3}", "  val: {holdout: 0.0005}\n",
     "stages.0.ptq.budget.confirm: data.val has 1 sample(s), too few to hold 0.5 of them out"),
])
def test_bad_budgets_are_refused_by_validate_in_one_line(cli, write_recipe, checkpoint, budget, val, message):
    recipe = _recipe(write_recipe, checkpoint, budget=budget, val=val)
    line = cli("validate", recipe).error_line()
    assert message in line


def test_a_task_metric_on_an_unlabeled_val_split_is_refused(cli, write_recipe, checkpoint):
    val = "  val: {source: python, factory: 'helpers_data:unlabeled'}\n"
    recipe = _recipe(write_recipe, checkpoint, budget="{max_drop: 0.3, metric: top1}", val=val, metric="agreement")
    line = cli("validate", recipe).error_line()
    assert "stages.0.ptq.budget.metric: top1 needs labels but data.val has none" in line
    # label-free, the budget measures agreement with the float model: valid
    assert cli("validate", _recipe(write_recipe, checkpoint, val=val, metric="agreement")).code == 0
