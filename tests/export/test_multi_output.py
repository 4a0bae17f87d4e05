"""Models with several outputs through PTQ -> export -> check: every output named in the ONNX, compared
in report.json, and a fault planted in the second output alone failing the check."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from helpers_faults import plant
from helpers_recipes import read_report

TWO_OUTPUTS = """\
name: two-outputs
model: {{factory: "helpers_models:logits_features"}}
data:
  train: {{source: digits, split: train, batch_size: 64}}
  calibration: {{source: digits, split: train, limit: 256}}
  eval: {{source: digits, split: test, batch_size: 256}}
metric: {{name: top1, output: output0}}
stages:
  - train: {{finetune: {{epochs: 3, lr: 0.05}}}}
  - ptq: {{calibrator: max}}
  - export:
      onnx: {{target: onnxruntime}}
      engine: {{batch_sizes: [1], bench_iters: 2}}
      check: {{max_drop: {max_drop}, min_cosine: 0.99}}
"""


@pytest.fixture
def two_output_run(tmp_path: Path, write_recipe, cli) -> tuple[Path, Path]:
    recipe = write_recipe(TWO_OUTPUTS.format(max_drop=1.0))
    run = tmp_path / "run"
    result = cli("run", recipe, "--out", run)
    assert result.code == 0, result.err
    return recipe, run


def test_two_outputs_are_exported_and_each_is_checked(two_output_run) -> None:
    _, run = two_output_run
    graph = onnx.load(str(run / "model.onnx")).graph
    assert [o.name for o in graph.output] == ["output0", "output1"]
    # every output keeps a dynamic batch axis
    assert all(o.type.tensor_type.shape.dim[0].dim_param == "batch" for o in graph.output)
    report = read_report(run)
    check = report["check"]
    assert check["passed"] and check["output"] == "output0"
    assert set(check["outputs"]) == {"output0", "output1"}
    for name, fid in check["outputs"].items():  # INT8 vs its fake-quant model: float rounding, not more
        assert fid["cosine"] > 0.999, name
    assert check["cosine"] == min(f["cosine"] for f in check["outputs"].values())
    assert report["metric"] == "top1" and report["metric_output"] == "output0"
    assert "| `output1` |" in (run / "report.md").read_text()
    assert report["stages"][0]["metrics"]["top1"] > 0.8  # trained on output0 for 3 epochs (typically 0.9+)


def test_a_fault_in_the_second_output_alone_fails_the_check(two_output_run, cli, tmp_path: Path) -> None:
    recipe, run = two_output_run
    clean = run / "model.onnx"
    faulty = plant(clean, tmp_path / "faulty.onnx", "feat", "zeroed channel")
    # the same graph in the same session: 0 error where the fault does not reach (any error is the fault's)
    args = ["--reference", clean, "--recipe", recipe, "--max-rel-error", "1e-6", "--optimization", "disabled"]
    ok = cli("check", clean, *args, "--report", tmp_path / "ok.json")
    assert ok.code == 0, ok.err
    bad = cli("check", faulty, *args, "--report", tmp_path / "bad.json")
    assert bad.code == 1, bad.err
    doc = json.loads((tmp_path / "bad.json").read_text())
    assert doc["output"] == "output0" and doc["drop"] == 0.0 and doc["changed"] == 0  # the task output is untouched
    assert doc["outputs"]["output0"]["max_abs"] == 0.0
    assert doc["outputs"]["output1"]["max_abs"] > 0.01
    assert len(doc["failures"]) == 1 and doc["failures"][0].startswith("output 'output1': max |error|")
    table = (tmp_path / "bad.md").read_text()
    assert "| `output0` (metric) | 1.0000 |" in table and "| `output1` |" in table


def test_output_names_are_checked_in_validate(write_recipe, cli) -> None:
    recipe = write_recipe(TWO_OUTPUTS.format(max_drop=1.0).replace("output: output0", "output: logits"))
    result = cli("validate", recipe)
    assert result.code == 2
    assert result.err.strip().splitlines() == [
        f"compress: error: {recipe}:7 metric.output: 'logits' is not an output of the model "
        "(it returns 'output0', 'output1')"]
    unnamed = write_recipe(TWO_OUTPUTS.format(max_drop=1.0).replace("{name: top1, output: output0}", "top1"))
    result = cli("validate", unnamed)
    assert result.code == 2
    assert result.err.startswith(f"compress: error: {unnamed}:7 metric: the model returns 2 outputs ('output0', "
                                 "'output1') and none is named logits or out")
    assert len(result.err.strip().splitlines()) == 1


SEGMENTATION = """\
name: lraspp
model:
  factory: torchvision.models.segmentation:lraspp_mobilenet_v3_large
  kwargs: {weights: null, weights_backbone: null, num_classes: 4}
data:
  train: {source: python, factory: "helpers_data:digit_segments", kwargs: {n: 64}, batch_size: 16}
  calibration: {source: python, factory: "helpers_data:digit_segments", kwargs: {n: 32}}
  eval: {source: python, factory: "helpers_data:digit_segments", kwargs: {split: test, n: 32}, batch_size: 16}
metric: miou
stages:
  - train: {finetune: {epochs: 4, lr: 0.05}}
  - ptq: {calibrator: max}
  - export:
      onnx: {target: onnxruntime}
      engine: {batch_sizes: [1], bench_iters: 2}
      check: {max_drop: 100, min_cosine: 0.9}
"""


@pytest.mark.slow
def test_segmentation_model_runs_ptq_export_check(tmp_path: Path, write_recipe, cli) -> None:
    recipe = write_recipe(SEGMENTATION)
    run = tmp_path / "run"
    result = cli("run", recipe, "--out", run)
    assert result.code == 0, result.err
    graph = onnx.load(str(run / "model.onnx")).graph
    assert [o.name for o in graph.output] == ["out"]
    report = read_report(run)
    assert set(report["baseline"]["metrics"]) >= {"miou"}
    check = report["check"]
    assert check["metric"] == "miou" and check["output"] == "out" and set(check["outputs"]) == {"out"}
    assert check["samples"] == 32
    # per pixel (32 x 32 x 32 = 32768 arg-maxes): INT8 flips fewer than 1% of them (measured: none)
    assert check["agreement"] >= 0.99 and check["passed"]
    trained = report["stages"][0]["metrics"]["miou"]
    assert trained > report["baseline"]["metrics"]["miou"] + 0.05  # the dict output trained (measured 0.03 -> 0.18)
