"""Distillation in recipes: the ``distill`` stage, ``finetune.distill`` in other stages, teachers, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers_recipes import read_report, stage_recipe

import compress
from compress.profile import count_macs


def _recipe(write_recipe, checkpoint: Path, stages: str) -> Path:
    return stage_recipe(write_recipe, checkpoint, stages, target=None)


STUDENT = "{factory: compress.zoo:digits_cnn, kwargs: {width: 12}}"


def test_distill_stage_trains_a_narrower_student_from_the_baseline(write_recipe, cli, digits_cnn_checkpoint, tmp_path):
    stage = (f"  - distill: {{student: {STUDENT}, hints: {{layer2: layer2}}, hint_weight: 0.5, cache: true,\n"
             "               finetune: {epochs: 4, lr: 0.05}}\n")
    out = tmp_path / "run"
    assert cli("run", _recipe(write_recipe, digits_cnn_checkpoint, stage), "--out", out, "--quiet").code == 0
    report = read_report(out)
    entry, base = report["stages"][0], report["baseline"]
    info = entry["distill"]
    assert info["teacher"] == "baseline" and info["student"] == "compress.zoo:digits_cnn"
    assert info["hints"] == [{"student": "layer2", "teacher": "layer2", "loss": "mse", "projection": "conv1x1 24->64"}]
    assert info["cache"]["samples_through_teacher"] == 1437  # each training sample once, then from the cache
    assert info["cache"]["samples_from_cache"] == 4 * 22 * 64 - 1437
    assert entry["teacher_metrics"]["top1"] == base["metrics"]["top1"]
    assert entry["macs"] < 0.2 * base["macs"] and entry["metrics"]["top1"] >= 0.9
    history = entry["finetune"]["history"]
    assert len(history) == 4 and history[-1]["kd_loss"] < history[0]["kd_loss"] and "hint_loss" in history[0]
    student = compress.load(out / "model.pt")  # the student, rebuilt from its own factory
    assert count_macs(student, torch.zeros(1, 1, 8, 8)) == entry["macs"]
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())["stages"][0]["distill"]
    assert resolved["temperature"] == 4.0 and resolved["alpha"] == 0.7  # defaults written out


@pytest.mark.slow
def test_distill_blocks_inside_prune_and_qat_and_a_stage_teacher(write_recipe, cli, digits_cnn_checkpoint, tmp_path):
    # prune -> finetune with KD from the baseline; qat with DESIGN.md's stage-level block, teacher: stage 1
    stages = (
        "  - prune: {method: channel, macs_reduction: 2.0, round_to: 2,\n"
        "            finetune: {epochs: 2, distill: {teacher: baseline, hints: {layer1: layer1}}}}\n"
        "  - qat: {finetune: {epochs: 1, lr: 0.001},\n"
        "          distill: {teacher: stage 1, alpha: 0.5, hints: {layer2.conv2: layer2.conv2}}}\n"
    )
    out = tmp_path / "run"
    assert cli("run", _recipe(write_recipe, digits_cnn_checkpoint, stages), "--out", out, "--quiet").code == 0
    prune, qat = read_report(out)["stages"]
    distilled = prune["prune"]["steps"][0]["finetune"]["distill"]  # channel pruning fine-tunes per step
    assert distilled["teacher"] == "baseline"
    projection = distilled["hints"][0]["projection"]
    assert projection.startswith("conv1x1 ") and projection.endswith("->32")  # the pruned layer1 is narrower
    assert qat["finetune"]["distill"]["teacher"] == "stage 1" and qat["finetune"]["distill"]["alpha"] == 0.5
    assert "kd_loss" in qat["finetune"]["history"][0] and "hint_loss" in qat["finetune"]["history"][0]
    assert qat["metrics"]["top1"] >= 0.97
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())["stages"][1]["qat"]
    assert "distill" not in resolved and resolved["finetune"]["distill"]["teacher"] == "stage 1"


@pytest.mark.parametrize("stage, expected", [
    ("- distill: {temperature: 0}", r"recipe.yaml:\d+ stages.0.distill.temperature: Input should be greater than 0"),
    ("- distill: {alpha: 1.5}", r"stages.0.distill.alpha: Input should be less than or equal to 1"),
    ("- train: {finetune: {distill: {alpha: -0.1}}}", r"stages.0.train.finetune.distill.alpha: Input should be greater"),
    ("- qat: {distill: {temperature: -1}}", r"recipe.yaml:\d+ stages.0.qat.finetune.distill.temperature: Input should"),
    ("- distill: {hints: {layer9: layer1}}", r"stages.0.distill.hints: the student has no layer 'layer9'; did you mean"),
    ("- distill: {hints: {layer1: nope}}", r"stages.0.distill.hints: the teacher has no layer 'nope'"),
    ("- distill: {teacher: {factory: compress.zoo:digits_cnn, kwargs: {num_classes: 7}}}",
     r"stages.0.distill.teacher: outputs \[7\] per sample but the student outputs \[10\]"),
    ("- distill: {teacher: teacher}", r"stages.0.distill.teacher: 'teacher' is not 'baseline', 'stage N'"),
    ("- distill: {teacher: stage 1}", r"stages.0.distill.teacher: 'stage 1' is not an earlier stage \(this is stage 1\)"),
    ("- distill: {label_free: true, alpha: 0.5}", r"stages.0.distill: label_free uses no labels"),
    ("- distill: {finetune: {distill: {}}}", r"stages.0.distill: .* at the stage level"),
    ("- train: {distill: {}, finetune: {distill: {}}}", r"stages.0.train.distill: given both here and in finetune.distill"),
    ("- distill: {cache: true, cache_max_mb: 0.01}", r"stages.0.distill.cache: 1437 samples x 40 bytes .* > cache_max_mb"),
    ("- distill: {teacher: {checkpoint: missing.pt}}", r"stages.0.distill.teacher: checkpoint missing.pt"),
    ("- qat: {finetune: {epochs: 1}, distill: {hints: {layer2: layer2}}}",
     r"stages.0.qat.finetune.distill.hints: the student is quantized .* such as 'layer2.conv1' or 'layer2.conv2'"),
    ("- distill: {student: {factory: compress.zoo:digits_cnn, kwargs: {num_classes: 3}}}",
     r"stages.0.distill.teacher: outputs \[10\] per sample but the student outputs \[3\]"),
])
def test_bad_distill_options_fail_in_one_line_naming_the_field(stage, expected, write_recipe, cli, digits_cnn_checkpoint,
                                                               tmp_path):
    recipe = _recipe(write_recipe, digits_cnn_checkpoint, f"  {stage}\n")
    for command in (("validate", recipe), ("run", recipe, "--out", tmp_path / "r", "--quiet")):
        message = cli(*command).error_line()
        assert __import__("re").search(expected, message), message
    assert not (tmp_path / "r").exists()  # nothing written


def test_a_stage_teacher_must_be_a_model_stage(write_recipe, cli, digits_cnn_checkpoint):
    stages = ("  - export: {engine: {batch_sizes: [1], bench_iters: 1}}\n"
              "  - distill: {teacher: stage 1, finetune: {epochs: 1}}\n")
    message = cli("validate", _recipe(write_recipe, digits_cnn_checkpoint, stages)).error_line()
    assert "stages.1.distill.teacher: stage 1 is 'export', which writes no model checkpoint" in message


def test_stage_level_distill_keeps_the_stages_own_finetune_defaults(write_recipe, digits_cnn_checkpoint):
    def qat(options: str):
        return compress.load_recipe(_recipe(write_recipe, digits_cnn_checkpoint, f"  - qat: {options}\n")).stages[0].config

    plain, taught = qat("{}"), qat("{distill: {teacher: baseline}}")
    assert taught.finetune.lr == plain.finetune.lr == 1e-3 and taught.finetune.epochs == plain.finetune.epochs == 1
    assert taught.finetune.distill.teacher == "baseline"
    assert qat("{distill: }").finetune.distill is None  # an empty block: no distillation


def test_label_free_runs_record_a_recipe_that_loads_again(write_recipe, cli, digits_cnn_checkpoint, tmp_path):
    stage = "  - distill: {label_free: true, finetune: {epochs: 1}}\n"
    out = tmp_path / "run"
    assert cli("run", _recipe(write_recipe, digits_cnn_checkpoint, stage), "--out", out, "--quiet").code == 0
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())["stages"][0]["distill"]
    assert resolved["label_free"] is True and resolved["alpha"] == 1.0
    assert cli("validate", out / "recipe.yaml").code == 0
    assert read_report(out)["stages"][0]["distill"]["alpha"] == 1.0


def test_a_stage_teacher_stands_in_as_the_student_that_stage_trains(write_recipe, cli, digits_cnn_checkpoint):
    # stage 1 trains an MLP student; stage 2's hint names the MLP's layer "3", which the baseline lacks
    stages = ("  - distill: {student: {factory: compress.zoo:digits_mlp}, finetune: {epochs: 1}}\n"
              "  - distill: {student: {factory: compress.zoo:digits_cnn, kwargs: {width: 8}}, teacher: stage 1,\n"
              "              hints: {fc: '3'}, finetune: {epochs: 1}}\n")
    result = cli("validate", _recipe(write_recipe, digits_cnn_checkpoint, stages))
    assert result.code == 0, result.err
