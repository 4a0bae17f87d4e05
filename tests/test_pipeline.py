"""Pipeline paths beyond the demo: label-free metrics, custom metrics, torchvision factories."""

import json
from pathlib import Path

import numpy as np
import pytest

import compress
from compress import pipeline
from compress.cli import main
from compress.data import build_dataset
from compress.recipe import DigitsData, parse_recipe

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    recipe = parse_recipe("""
name: small-base
model: {factory: compress.zoo:digits_cnn, kwargs: {width: 8}}
data:
  train: {source: digits, split: train}
  eval: {source: digits, split: test}
stages: [{train: {finetune: {epochs: 4, lr: 0.05}}}]
""")
    outcome = pipeline.run(recipe, out, progress=False, log=None)
    return out / "model.pt", outcome.report


def test_label_free_run_on_unlabeled_npz(trained, tmp_path):
    ckpt, _ = trained
    x = build_dataset(DigitsData(source="digits", split="test")).tensors[0].numpy()
    np.savez(tmp_path / "unlabeled.npz", x=x)
    recipe = parse_recipe(f"""
name: label-free
model: {{checkpoint: {ckpt}}}
data:
  eval: {{source: npz, path: {tmp_path / 'unlabeled.npz'}, y: null}}
metric: agreement
stages:
  - export: {{engine: {{batch_sizes: [4], bench_iters: 2}}, check: {{max_drop: 0.1, min_agreement: 0.99}}}}
""")
    outcome = pipeline.run(recipe, tmp_path / "run", progress=False, log=None)
    report = outcome.report
    assert outcome.exit_code == 0
    assert report["baseline"]["metrics"]["agreement"] == 1.0  # the input model is its own reference
    assert report["engine"]["metrics"]["agreement"] == 1.0
    assert report["check"]["metric"] == "agreement" and report["check"]["drop"] == 0.0
    assert report["check"]["samples"] == 360


def test_custom_metric_callable(trained, tmp_path):
    ckpt, base_report = trained
    recipe = parse_recipe(f"""
name: custom-metric
model: {{checkpoint: {ckpt}}}
data: {{eval: {{source: digits, split: test}}}}
metric: helpers_metrics:top2
stages: []
""")
    report = pipeline.run(recipe, tmp_path / "run", progress=False, log=None).report
    top2 = report["baseline"]["metrics"]["helpers_metrics:top2"]
    assert base_report["stages"][0]["metrics"]["top1"] <= top2 <= 1.0
    assert top2 > 0.9


def test_torchvision_factory_validates_on_upscaled_digits(tmp_path, capsys):
    recipe = tmp_path / "tv.yaml"
    recipe.write_text("""
name: tv-resnet18
model: {factory: "torchvision.models:resnet18", kwargs: {num_classes: 10}}
data:
  train: {source: digits, split: train, size: 32, channels: 3, limit: 64}
  eval:  {source: digits, split: test, size: 32, channels: 3, limit: 64}
stages:
  - train: {finetune: {epochs: 1}}
  - export: {}
""")
    assert main(["validate", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "torchvision.models:resnet18" in out and "11,181,642 params" in out


def test_checkpoint_metadata_and_report_stage_fields(trained):
    ckpt, report = trained
    stage = report["stages"][0]
    assert set(stage) >= {"type", "seconds", "metrics", "params", "nonzero_params", "macs", "checkpoint", "finetune"}
    assert stage["checkpoint"] == "stages/01-train/checkpoint.pt"
    assert len(stage["finetune"]["history"]) == 4
    assert stage["metrics"]["top1"] > 0.9
    model = compress.load(ckpt)
    assert sum(p.numel() for p in model.parameters()) == stage["params"]
    assert json.loads(json.dumps(report))  # JSON-clean
