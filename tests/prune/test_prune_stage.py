"""The ``prune`` stage through `compress run` / `compress validate`: reports, checkpoints, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_recipes import read_report as _report
from helpers_recipes import stage_recipe

import compress
from compress.models import count_nonzero_params, count_params
from compress.profile import count_macs


def _recipe(write_recipe, checkpoint: Path, stages: str, export: bool = False) -> Path:
    return stage_recipe(write_recipe, checkpoint, stages, target="onnxruntime" if export else None, min_agreement=0.98)


@pytest.mark.slow
def test_channel_stage_halves_macs_keeps_accuracy_exports_and_reloads(write_recipe, cli, digits_cnn_checkpoint,
                                                                      tmp_path) -> None:
    stage = "  - prune: {method: channel, macs_reduction: 2.0, steps: 2, round_to: 2, finetune: {epochs: 2}}\n"
    out = tmp_path / "run"
    assert cli("run", _recipe(write_recipe, digits_cnn_checkpoint, stage, export=True), "--out", out, "--quiet").code == 0
    report = _report(out)
    entry, base = report["stages"][0], report["baseline"]
    info = entry["prune"]
    assert [s["step"] for s in info["steps"]] == [1, 2] and info["steps"][0]["macs"] > info["steps"][1]["macs"]
    assert 2.0 <= base["macs"] / entry["macs"] == pytest.approx(info["macs_reduction"], rel=1e-3)
    assert base["macs"] / entry["macs"] < 2.4 and entry["params"] < base["params"] * 0.6
    assert info["skipped"] == {"fc": "feeds the model's output through 'fc'"}
    assert entry["metrics"]["top1"] >= base["metrics"]["top1"] - 0.02
    assert report["check"]["passed"] and report["engine"]["metrics"]["top1"] == pytest.approx(entry["metrics"]["top1"], abs=0.01)
    x = torch.randn(2, 1, 8, 8)
    for path in (out / entry["checkpoint"], out / "model.pt"):  # weights_only load rebuilds the pruned shapes
        model = compress.load(path)
        assert count_params(model) == entry["params"] and count_macs(model, x) == entry["macs"]
        assert all(m.out_channels % 2 == 0 for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def test_l1_stage_reports_true_nonzero_counts(write_recipe, cli, digits_cnn_checkpoint, tmp_path) -> None:
    stage = ("  - prune:\n      method: l1_unstructured\n      scope: global\n"
             "      schedule: {steps: 3, start_ratio: 0.3, end_ratio: 0.7}\n      finetune: {epochs: 2}\n")
    out = tmp_path / "run"
    # keep_best selects on data.val (off without one): hold out a tenth of train for it
    assert cli("run", _recipe(write_recipe, digits_cnn_checkpoint, stage), "--out", out, "--quiet",
               "--set", "data.val={holdout: 0.1}").code == 0
    entry = _report(out)["stages"][0]
    model = compress.load(out / entry["checkpoint"])
    assert entry["nonzero_params"] == count_nonzero_params(model) < entry["params"] == count_params(model)
    info = entry["prune"]
    assert info["ratio"] == pytest.approx(0.7) and info["sparsity"] == pytest.approx(0.7, abs=1e-4)
    assert info["weights"] - info["nonzero"] == sum(int((m.weight == 0).sum()) for n, m in model.named_modules()
                                                    if n in info["layers"])
    assert entry["finetune"]["best_epoch"] == 2
    assert entry["metrics"]["top1"] > 0.9


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        ("{method: channel, ratio: 1.5}", "recipe.yaml:9 stages.0.prune.ratio: Input should be less than 1"),
        ("{method: channel, ratio: 0.5, include: [head*]}", "stages.0.prune.include: pattern 'head*' matches no"),
        ("{method: channel, ratio: 0.97, scope: global}", "would remove every output channel of layer 'stem.0'"),
        ("{method: channel, macs_reduction: 1.0e+9}", "stages.0.prune.macs_reduction: 1e+09x is out of reach"),
        ("{method: l1_unstructured, ratio: 0.5, importance: l2}", "'importance' does not apply to method l1_unstructured"),
        ("{method: channel, schedule: {steps: 2, end_ratio: 0.5}}", "'schedule' does not apply to method channel"),
        ("{method: channel}", "give exactly one of ratio, macs_reduction or latency (got none)"),
        ("{method: l1_unstructured, schedule: {steps: 2, end_ratio: 0.5}, finetune: {epochs: 0}}",
         "schedule prunes gradually during the fine-tune, which has epochs: 0"),
    ],
    ids=["ratio", "include", "every-channel", "macs", "l1-importance", "channel-schedule", "no-target", "schedule-0"],
)
def test_bad_prune_stages_fail_validate_and_run_in_one_line(stage, expected, write_recipe, cli, digits_cnn_checkpoint,
                                                            tmp_path) -> None:
    recipe = _recipe(write_recipe, digits_cnn_checkpoint, f"  - prune: {stage}\n")
    assert expected in cli("validate", recipe).error_line()
    out = tmp_path / "run"
    assert expected in cli("run", recipe, "--out", out, "--quiet").error_line()
    assert not out.exists()


def test_prune_after_quantization_is_refused(write_recipe, cli, digits_cnn_checkpoint) -> None:
    stages = "  - ptq: {limit: 128}\n  - prune: {method: channel, ratio: 0.3}\n"
    msg = cli("validate", _recipe(write_recipe, digits_cnn_checkpoint, stages)).error_line()
    assert "recipe.yaml:10 stages.1.prune: prune must come before quantization" in msg


def test_a_model_whose_forward_hard_codes_channels_names_the_layer(write_recipe, cli) -> None:
    recipe = write_recipe(
        "name: r\nmodel: {factory: 'helpers_prune:hard_reshape'}\n"
        "data:\n  eval: {source: digits, split: test}\nmetric: agreement\n"
        "stages:\n  - prune: {method: channel, ratio: 0.5, round_to: 1, finetune: {epochs: 0}}\n"
    )
    msg = cli("validate", recipe).error_line()
    assert "recipe.yaml:7 stages.0.prune: pruning the output channels of layer 'conv1' breaks" in msg
