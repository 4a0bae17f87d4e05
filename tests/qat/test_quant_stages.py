"""ptq / qat stages through `compress run` and `compress validate`: reports, checkpoints, bad input."""

from __future__ import annotations

import pytest
import torch
from helpers_recipes import read_report, stage_recipe

import compress
from compress import quant


@pytest.mark.slow
def test_ptq_for_onnxruntime_runs_int8_and_passes_the_check(write_recipe, cli, digits_cnn_checkpoint, tmp_path) -> None:
    recipe = stage_recipe(write_recipe, digits_cnn_checkpoint, "  - ptq: {calibrator: mse, limit: 200}\n")
    out = tmp_path / "run"
    assert cli("run", recipe, "--out", out, "--quiet").code == 0
    report = read_report(out)
    stage = report["stages"][0]
    assert stage["target"] == "onnxruntime" and stage["calibration"]["samples"] == 200
    assert stage["calibration"]["method"] == "mse" and stage["calibration"]["split"] == "calibration"
    assert stage["metrics"]["top1"] >= report["baseline"]["metrics"]["top1"] - 0.01
    assert report["export"]["quantized"] and report["export"]["int32_biases"] == 7
    assert report["engine"]["int8_weighted_fraction"] == 1.0 and report["engine"]["int8_ops"]["QLinearConv"] == 6
    check = report["check"]
    assert check["passed"] and check["agreement"] >= 0.99 and check["onnx_vs_model"]["agreement"] >= 0.99
    rebuilt = compress.load(out / stage["checkpoint"])
    assert quant.target_of(rebuilt) is quant.Target.onnxruntime and not quant.uncalibrated(rebuilt)


@pytest.mark.slow
def test_qat_after_ptq_for_tensorrt_trains_and_passes_the_rules(write_recipe, cli, digits_cnn_checkpoint, tmp_path) -> None:
    stages = "  - ptq: {calibrator: max}\n  - qat:\n      finetune: {epochs: 2, lr: 0.001}\n      freeze_bn_after: 1\n"
    recipe = stage_recipe(write_recipe, digits_cnn_checkpoint, stages, target="tensorrt")
    out = tmp_path / "run"
    assert cli("run", recipe, "--out", out, "--quiet").code == 0
    report = read_report(out)
    ptq_stage, qat_stage = report["stages"]
    assert "calibration" not in qat_stage and qat_stage["target"] == "tensorrt"  # kept ptq's ranges
    assert len(qat_stage["finetune"]["history"]) == 2
    assert qat_stage["metrics"]["top1"] >= report["baseline"]["metrics"]["top1"] - 0.01
    assert report["export"]["tensorrt_rules"] == {"passed": True, "checked_ops": 7, "float_ops": 0, "violations": []}
    assert report["check"]["passed"]
    before = compress.load(out / ptq_stage["checkpoint"]).state_dict()
    after = compress.load(out / qat_stage["checkpoint"]).state_dict()
    assert not torch.equal(before["layer1.conv1.weight"], after["layer1.conv1.weight"])  # QAT trained
    assert not torch.equal(before["layer1.conv1.weight_quantizer.amax"], after["layer1.conv1.weight_quantizer.amax"])
    # BatchNorm statistics stopped moving in the epoch after freeze_bn_after
    final = compress.load(out / "model.pt").eval()
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(final(x), compress.load(out / qat_stage["checkpoint"]).eval()(x))
    steps = after["layer1.bn1.num_batches_tracked"] - before["layer1.bn1.num_batches_tracked"]
    assert steps == 1437 // 64  # one epoch of 22 steps, not two


def test_qat_alone_calibrates_first(write_recipe, cli, digits_cnn_checkpoint, tmp_path) -> None:
    stages = "  - qat:\n      calibrator: percentile\n      limit: 128\n      finetune: {epochs: 1, lr: 0.001}\n"
    recipe = stage_recipe(write_recipe, digits_cnn_checkpoint, stages, target=None)
    out = tmp_path / "run"
    assert cli("run", recipe, "--out", out, "--quiet").code == 0
    stage = read_report(out)["stages"][0]
    assert stage["calibration"]["samples"] == 128 and stage["target"] == "tensorrt"  # no export: the default


@pytest.mark.parametrize(
    ("stages", "expected"),
    [
        ("  - ptq: {exclude: [head]}\n", "recipe.yaml:9 stages.0.ptq.exclude: pattern 'head' matches no quantizable layer"),
        ("  - ptq: {target: tensorrt}\n", "recipe.yaml:9 stages.0.ptq.target: is tensorrt but "),
        ("  - ptq: {target: tensorrt}\n", "recipe.yaml:11 stages.1.export.onnx.target is onnxruntime"),
        ("  - ptq: {calibrator: entorpy}\n", "stages.0.ptq.calibrator"),
        ("  - ptq: {percentile: 0}\n", "stages.0.ptq.percentile"),
        ("  - qat: {freeze_bn_after: -1}\n", "stages.0.qat.freeze_bn_after"),
    ],
)
def test_bad_quant_options_fail_validation_with_file_line(write_recipe, cli, digits_cnn_checkpoint, stages, expected, tmp_path) -> None:
    recipe = stage_recipe(write_recipe, digits_cnn_checkpoint, stages)
    assert expected in cli("validate", recipe).error_line()
    out = tmp_path / "never"
    assert expected in cli("run", recipe, "--out", out, "--quiet").error_line()
    assert not out.exists()


def test_ptq_without_calibration_or_train_data_is_an_error(write_recipe, cli, digits_cnn_checkpoint) -> None:
    text = f"""\
    name: q
    model: {{checkpoint: {digits_cnn_checkpoint}}}
    data: {{eval: {{source: digits, split: test}}}}
    stages:
      - ptq: {{}}
    """
    msg = cli("validate", write_recipe(text)).error_line()
    assert "stages.0.ptq" in msg and "needs data.train" in msg


BAD_ACTIVATIONS = """\
name: bad
model: {{factory: "helpers_quant:{factory}"}}
data:
  calibration: {{source: digits, split: train, limit: 64}}
  eval: {{source: digits, split: test}}
metric: agreement
stages:
  - ptq: {{calibrator: max}}
"""


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        ("nan_after_conv", "fc.input_quantizer: NaN or Inf activations during calibration"),
        ("dead_branch", "head.input_quantizer: calibration gave amax 0"),
    ],
)
def test_bad_activations_stop_calibration_naming_stage_and_quantizer(write_recipe, cli, tmp_path, factory, expected) -> None:
    out = tmp_path / "run"
    msg = cli("run", write_recipe(BAD_ACTIVATIONS.format(factory=factory)), "--out", out, "--quiet").error_line()
    assert "recipe.yaml:8 stages.0.ptq" in msg and expected in msg
    assert not (out / "stages" / "01-ptq" / "metrics.json").exists() and not (out / "model.pt").exists()


def test_options_that_would_be_ignored_are_refused_before_anything_runs(
    write_recipe, cli, digits_cnn_checkpoint, tmp_path
) -> None:
    stages = "  - ptq: {}\n  - qat:\n      exclude: [fc]\n      finetune: {epochs: 1}\n"
    recipe = stage_recipe(write_recipe, digits_cnn_checkpoint, stages, target=None)
    msg = cli("run", recipe, "--out", tmp_path / "r", "--quiet").error_line()
    assert "stages.1.qat.exclude: has no effect: the model is already quantized" in msg
    assert not (tmp_path / "r").exists()


def test_quantized_checkpoint_with_another_export_target_fails_validation(
    write_recipe, cli, digits_cnn_checkpoint, tmp_path
) -> None:
    from helpers_quant import digits

    from compress import ptq

    qmodel = quant.prepare(compress.load(digits_cnn_checkpoint), "onnxruntime")
    ptq.calibrate(qmodel, digits("train"), limit=64)
    compress.save(qmodel, tmp_path / "q.pt")
    recipe = stage_recipe(write_recipe, tmp_path / "q.pt", "", target="tensorrt")
    msg = cli("validate", recipe).error_line()
    assert "stages.0.export.onnx.target: is tensorrt but the model was quantized for onnxruntime" in msg
