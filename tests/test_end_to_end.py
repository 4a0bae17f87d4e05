"""The README demo end to end: baseline recipe, then export -> engine -> check, through the CLI."""

import json
from pathlib import Path

import onnx
import pytest
import torch

import compress
from compress.cli import main

ROOT = Path(__file__).parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """runs/digits-base/model.pt as `make demo` trains it (here under a temp dir)."""
    out = tmp_path_factory.mktemp("runs") / "digits-base"
    assert main(["run", str(ROOT / "recipes/digits_baseline.yaml"), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.mark.slow
def test_baseline_recipe_trains_a_good_model(baseline):
    report = json.loads((baseline / "report.json").read_text())
    assert report["stages"][0]["metrics"]["top1"] >= 0.95
    assert report["stages"][0]["params"] == report["baseline"]["params"] > 0
    model = compress.load(baseline / "model.pt")  # the final model, pickle-free
    ckpt = torch.load(baseline / "model.pt", weights_only=True)
    assert ckpt["factory"] == "compress.zoo:digits_cnn"
    assert isinstance(model, torch.nn.Module)


@pytest.mark.slow
def test_demo_export_recipe_meets_the_done_criteria(baseline, tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["run", str(ROOT / "recipes/digits_export.yaml"), "--out", str(out), "--quiet",
                 "--set", f"model.checkpoint={baseline / 'model.pt'}"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["baseline"]["metrics"]["top1"] >= 0.95
    assert abs(report["engine"]["metrics"]["top1"] - report["baseline"]["metrics"]["top1"]) * 100 <= 0.1
    assert report["check"]["passed"] is True
    assert report["check"]["agreement"] >= 0.99 and report["check"]["cosine"] > 0.9999
    assert report["check"]["samples"] == 360
    assert report["export"]["opset"] == 13 and report["export"]["qdq_pairs"] == 0
    assert set(report["engine"]["latency_ms"]) == {"1", "8", "32"}
    assert all(v > 0 for v in report["engine"]["latency_ms"].values())
    proto = onnx.load(str(out / "model.onnx"))
    assert proto.opset_import[0].version == 13
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch
    assert (out / "engine.onnx").stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "| baseline | 1.0000 |" in md or "| baseline | 0.9" in md
    assert (out / "report_tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert set(report["engine"]["vs_baseline"]["ms"]) == {"baseline", "engine"}  # float export: no INT8 point

    # `compress check`: the engine against the PyTorch checkpoint on the digits test split
    capsys.readouterr()
    code = main(["check", str(out / "engine.onnx"), "--reference", str(baseline / "model.pt"),
                 "--data", "digits:test", "--min-agreement", "0.99", "--json", "--report", str(tmp_path / "drift.json")])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["passed"] and result["samples"] == 360 and result["drop_unit"] == "samples"
    assert result["drop"] == pytest.approx(0.0, abs=1e-9)
    written = json.loads((tmp_path / "drift.json").read_text())  # the drift report file
    assert written["model"] == str(out / "engine.onnx") and written["agreement"] == result["agreement"]


@pytest.mark.slow
def test_failed_accuracy_check_exits_1_and_says_why(baseline, tmp_path, capsys):
    # An impossible threshold: FP32 ORT differs from PyTorch by ~1e-6, so cosine is just below 1.
    code = main(["run", str(ROOT / "recipes/digits_export.yaml"), "--out", str(tmp_path / "r"), "--quiet",
                 "--set", f"model.checkpoint={baseline / 'model.pt'}",
                 "--set", "stages.0.export.check.min_cosine=1.0"])
    assert code == 1
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["passed"] is False and report["check"]["failures"][0].startswith("cosine")


def test_a_perturbed_engine_fails_compress_check(baseline, tmp_path, capsys):
    """A model whose head weights were damaged must fail the check against the good one (exit 1)."""
    model = compress.load(baseline / "model.pt")
    with torch.no_grad():
        model.fc.weight.mul_(-1.0)
    compress.export.onnx(model, torch.zeros(1, 1, 8, 8), tmp_path / "bad.onnx")
    code = main(["check", str(tmp_path / "bad.onnx"), "--reference", str(baseline / "model.pt"),
                 "--data", "digits:test", "--report", str(tmp_path / "drift.json")])
    out = capsys.readouterr().out
    assert json.loads((tmp_path / "drift.json").read_text())["passed"] is False
    assert code == 1 and "FAILED" in out and "top1 drop" in out


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates(recipe, baseline, capsys):
    code = main(["validate", str(recipe), "--set", f"model.checkpoint={baseline / 'model.pt'}"]
                if "checkpoint:" in recipe.read_text() else ["validate", str(recipe)])
    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip().endswith("valid")


@pytest.mark.slow
def test_int8_demo_recipe_runs_int8_kernels_within_four_samples(baseline, tmp_path):
    out = tmp_path / "demo"
    code = main(["run", str(ROOT / "recipes/digits_demo.yaml"), "--out", str(out), "--quiet",
                 "--set", f"model.checkpoint={baseline / 'model.pt'}"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert [s["type"] for s in report["stages"]] == ["prune", "distill", "sparsity", "ptq", "qat"]
    assert report["stages"][1]["distill"]["teacher"] == "baseline"  # distilled after pruning
    assert report["stages"][2]["finetune"]["distill"]["teacher"] == "baseline"  # while fine-tuning 2:4
    assert report["stages"][4]["finetune"]["distill"]["teacher"] == "baseline"  # and during QAT
    sparse = report["stages"][2]["sparsity"]["sparse_layers"]
    assert len(sparse) == 5 and set(report["stages"][2]["sparsity"]["skipped"]) == {"stem.0", "fc"}
    assert report["stages"][-1]["nonzero_params"] < 0.6 * report["stages"][-1]["params"]
    assert report["export"]["sparsity"]["sparse_layers"] == sparse  # int8 weights in the ONNX are 2:4
    assert report["export"]["sparsity"]["missing"] == []
    assert (out / "triton" / "digits-demo" / "1" / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    assert report["provenance"]["files"]["engine"]["path"] == str(out / "engine.onnx")
    text = (out / "report.md").read_text()
    assert "## Distillation" in text and "## Sparsity" in text
    assert report["baseline"]["macs"] / report["stages"][-1]["macs"] >= 2.0  # channel pruning: half the MACs
    assert report["check"]["reference"] == "baseline"  # checked against the unpruned FP32 model
    # In samples of the 360 test images: seeds 0-5 lost 1-3 (2x pruning + 2:4 + INT8 against the unpruned
    # FP32 model); 4 allows float-order effects on top, and stays inside the recipe's max_drop_samples: 6.
    assert report["check"]["drop_samples"] <= 4 and report["check"]["thresholds"]["max_drop_samples"] == 6
    fp32, engine = report["baseline"]["metrics"]["top1"], report["engine"]["metrics"]["top1"]
    assert round((fp32 - engine) * 360) == report["check"]["drop_samples"]
    assert report["export"]["quantized"] and report["export"]["qdq_pairs"] > 0
    assert report["engine"]["int8_weighted_fraction"] == 1.0
    assert report["check"]["passed"] and report["check"]["engine_vs_onnx"]["agreement"] >= 0.99
    # the plot's latency axis: the engine, the baseline's FP32 engine and the compressed structure in FP32, timed
    # together at batch 8; int8 weights of half the channels: the engine file is a fraction of the FP32 baseline's
    timed = report["engine"]["vs_baseline"]
    assert timed["batch_size"] == 8 and set(timed["ms"]) == {"baseline", "float", "engine"}
    assert all(v > 0 for v in timed["ms"].values()) and timed["iters"] == 20
    assert timed["bytes"]["engine"] < 0.25 * timed["bytes"]["baseline"]
    assert "Against the baseline's FP32 engine at batch 8" in text
    proto = onnx.load(str(out / "model.onnx"))
    assert proto.opset_import[0].version == 13
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in proto.graph.node}
    assert (out / "model.onnx").stat().st_size < 0.5 * 4 * report["baseline"]["params"]  # int8 weights
