"""The ``sparsity`` stage in recipes: report, persistence through QAT/export/checkpoints, resume, bad input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers_recipes import read_report, stage_recipe

import compress
from compress import sparsity


def test_sparsity_then_qat_exports_verified_2to4_int8_weights(write_recipe, cli, digits_cnn_checkpoint, tmp_path):
    stages = ("  - sparsity: {permute: true, finetune: {epochs: 2, lr: 0.01}}\n"
              "  - qat: {finetune: {epochs: 1, lr: 0.001}}\n")
    recipe = stage_recipe(write_recipe, digits_cnn_checkpoint, stages, target="tensorrt", min_agreement=0.97)
    out = tmp_path / "run"
    result = cli("run", recipe, "--out", out, "--quiet")
    assert result.code == 0, result.err
    report = read_report(out)
    sp, qat = report["stages"]
    info = sp["sparsity"]
    layers = ["layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2", "layer2.shortcut.0"]
    assert list(info["layers"]) == layers and info["sparse_layers"] == layers
    assert info["skipped"] == {"stem.0": "input channels 1 are not a multiple of 16",
                               "fc": "output channels 10 are not a multiple of 8"}
    assert info["estimate"]["eligible_macs_share"] > 0.95 and 1.9 < info["estimate"]["best_case_speedup"] < 2.0
    assert sum(v["retained"] - v["retained_unpermuted"] for v in info["layers"].values()) > 0  # trained weights gain
    assert {p["root"] for p in info["permutations"]} == {"stem.0", "layer1.conv1", "layer2.conv1"}
    assert all("skipped" not in p and p["swaps"] > 0 for p in info["permutations"])
    assert info["masked_metric"] < sp["metrics"]["top1"]  # masking hurts, the fine-tune recovers
    assert sp["metrics"]["top1"] >= report["baseline"]["metrics"]["top1"] - 0.02
    assert sp["nonzero_params"] == sp["params"] - sum(
        v["shape"][0] * v["shape"][1] * v["shape"][2] * v["shape"][3] // 2 for v in info["layers"].values())
    assert qat["nonzero_params"] <= sp["nonzero_params"]  # QAT kept every masked weight at zero
    exported = report["export"]["sparsity"]
    assert exported["sparse_layers"] == layers and exported["missing"] == [] and exported["sparse_weights"]
    assert report["check"]["passed"]
    assert "## Sparsity" in (out / "report.md").read_text()
    for checkpoint in (out / sp["checkpoint"], out / "model.pt"):  # both reload with their masks
        model = compress.load(checkpoint)
        assert sparsity.sparse_layers(model) == layers
        assert sparsity.verify_model(model).sparse_layers == layers


def test_resume_after_sparsity_keeps_the_masks(write_recipe, cli, digits_cnn_checkpoint, tmp_path):
    stages = ("  - sparsity: {permute: false, finetune: {epochs: 1}}\n"
              "  - train: {finetune: {epochs: 1, lr: 0.05}}\n")
    recipe = stage_recipe(write_recipe, digits_cnn_checkpoint, stages, target=None)
    out = tmp_path / "run"
    assert cli("run", recipe, "--out", out, "--quiet").code == 0
    first = compress.load(out / "model.pt")
    for path in (out / "stages" / "02-train").iterdir():  # as if the run had stopped after stage 1
        path.unlink()
    (out / "stages" / "02-train").rmdir()
    (out / "model.pt").unlink()
    assert cli("run", recipe, "--out", out, "--quiet", "--resume").code == 0
    again = compress.load(out / "model.pt")
    assert len(sparsity.verify_model(again).sparse_layers) == 5  # the train stage re-applied the loaded masks
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)  # and the resumed run repeats the same stage exactly


@pytest.mark.parametrize("stages, expected", [
    ("  - sparsity: {pattern: '1:4'}\n",
     r"recipe.yaml:\d+ stages.0.sparsity.pattern: '1:4' is not supported; only '2:4' \(the pattern sparse tensor cores run\)"),
    ("  - sparsity: {finetune: {epochs: 0}}\n  - prune: {method: channel, ratio: 0.25}\n",
     r"stages.1.prune: prune cannot follow sparsity \(.*recipe.yaml:\d+ stages.0.sparsity\)"),
    ("  - sparsity: {finetune: {epochs: 0}}\n  - prune: {method: l1_unstructured, ratio: 0.5}\n",
     r"stages.1.prune: prune cannot follow sparsity"),
    ("  - ptq: {}\n  - sparsity: {}\n", r"stages.1.sparsity: sparsity must come before quantization"),
    ("  - sparsity: {finetune: {epochs: 0}}\n  - sparsity: {}\n", r"stages.1.sparsity: the model is already 2:4 sparse"),
    ("  - sparsity: {include: ['conv*']}\n", r"stages.0.sparsity.include: pattern 'conv\*' matches no"),
    ("  - sparsity: {exclude: ['layer*']}\n",
     r"stages.0.sparsity: no layer can be 2:4 sparse \(stem.0: input channels 1 are not a multiple of 16"),
    ("  - sparsity: {permute: maybe}\n", r"stages.0.sparsity.permute: Input should be a valid boolean"),
    ("  - prune: {method: channel, ratio: 0.3, round_to: 2}\n  - sparsity: {}\n",
     r"stages.1.sparsity: no layer can be 2:4 sparse \(.*layer1.conv1: input channels 24 are not a multiple of 16.*"
     r"judged on the model after stage 1's dry run; channel pruning with round_to: 16"),
    ("  - sparsity: {patern: '2:4'}\n", r"stages.0.sparsity.patern: unknown key.*did you mean 'pattern'"),
])
def test_bad_sparsity_recipes_fail_in_one_line_naming_the_stage(stages, expected, write_recipe, cli,
                                                                digits_cnn_checkpoint, tmp_path):
    recipe = stage_recipe(write_recipe, digits_cnn_checkpoint, stages, target=None)
    for command in (("validate", recipe), ("run", recipe, "--out", tmp_path / "r", "--quiet")):
        result = cli(*command)
        assert result.code == 2
        assert re.search(expected, result.error_line()), result.error_line()
    assert not (tmp_path / "r").exists()  # nothing written


def test_a_model_without_eligible_layers_is_refused(write_recipe, cli, tmp_path):
    model = compress.build("compress.zoo:digits_mlp", {"hidden": 12})  # 64->12->10: no shape fits
    compress.save(model, tmp_path / "mlp.pt")
    recipe = stage_recipe(write_recipe, Path(tmp_path / "mlp.pt"), "  - sparsity: {}\n", target=None)
    result = cli("validate", recipe)
    assert result.code == 2
    assert re.search(r"stages.0.sparsity: no layer can be 2:4 sparse \(1: output channels 12 are not a multiple "
                     r"of 8; 3: input channels 12 are not a multiple of 16\)", result.error_line())


def test_validate_prints_the_preflight_estimate(write_recipe, cli, digits_cnn_checkpoint):
    recipe = stage_recipe(write_recipe, digits_cnn_checkpoint, "  - sparsity: {exclude: [layer2.shortcut.0]}\n",
                          target=None)
    result = cli("validate", recipe)
    assert result.code == 0
    assert ("2:4 on 4 layers, 98% of the MACs: best case 1.95x; stem.0 dense (input channels 1 are not a multiple of "
            "16); layer2.shortcut.0 dense (left out by include/exclude); fc dense") in result.out


def test_export_fails_when_the_onnx_lost_the_models_2to4_pattern(tmp_path):
    from compress.export.stage import _sparsity

    model = compress.build("compress.zoo:digits_cnn", {}).eval()
    x = torch.zeros(1, 1, 8, 8)
    sparsity.apply_2to4(model, example_input=x)
    compress.export.onnx(model, x, tmp_path / "ok.onnx")
    assert _sparsity(model, tmp_path / "ok.onnx")["missing"] == []
    sparsity.enforce.remove(model)  # a bug that took the model's mask hooks off and let weights move
    with torch.no_grad():
        model.layer2.conv2.weight.add_(0.01)
    compress.export.onnx(model, x, tmp_path / "lost.onnx")
    summary = _sparsity(model, tmp_path / "lost.onnx")
    assert summary["missing"] == ["layer2.conv2"] and "layer2.conv2" not in summary["sparse_layers"]


def test_a_new_distill_student_after_sparsity_may_be_pruned(write_recipe, cli, digits_cnn_checkpoint):
    stages = ("  - sparsity: {finetune: {epochs: 0}}\n"
              "  - distill: {student: {factory: compress.zoo:digits_cnn, kwargs: {width: 16}}, finetune: {epochs: 1}}\n"
              "  - prune: {method: channel, ratio: 0.5}\n")
    result = cli("validate", stage_recipe(write_recipe, digits_cnn_checkpoint, stages, target=None))
    assert result.code == 0, result.err  # the student is a new, dense model
