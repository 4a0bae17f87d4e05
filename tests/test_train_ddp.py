"""The shared fine-tune loop under torchrun: 2 gloo processes reproduce the 1-process run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_finetune.py"


def _run(tmp_path: Path, factory: str, nproc: int, *extra: str) -> dict:
    out = tmp_path / f"{factory.split(':')[1]}-{nproc}{''.join(extra)}.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT), str(out), factory, *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(SCRIPT), str(out), factory, *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.slow
def test_two_processes_match_one_process_exactly_without_batchnorm(tmp_path):
    # digits_mlp has no BatchNorm, so DDP's averaged gradients over 2 x 32 samples equal the
    # 1-process gradient over the same 64: weights must agree to float rounding.
    one = _run(tmp_path, "compress.zoo:digits_mlp", 1)
    two = _run(tmp_path, "compress.zoo:digits_mlp", 2)
    assert one["world"] == 1 and two["world"] == 2
    for key, value in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert one["top1"] > 0.9
    assert two["top1"] == pytest.approx(one["top1"], abs=1e-9)


@pytest.mark.slow
def test_distillation_under_two_processes_matches_one_process(tmp_path):
    # KD + a hint whose projection is callback-owned: its gradients are averaged across processes
    # like the model's, so student and projection weights agree with the 1-process run.
    one = _run(tmp_path, "compress.zoo:digits_mlp", 1, "distill")
    two = _run(tmp_path, "compress.zoo:digits_mlp", 2, "distill")
    losses = [run["state_dict"].pop("kd_loss") for run in (one, two)]  # logged per process: not compared
    assert "projection.hint:2.map.weight" in one["state_dict"] and min(losses) > 0
    for key, value in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_2to4_masks_hold_under_two_processes_and_match_one_process(tmp_path):
    one = _run(tmp_path, "compress.zoo:digits_mlp", 1, "sparse")
    two = _run(tmp_path, "compress.zoo:digits_mlp", 2, "sparse")
    assert one["sparse_layers"] == two["sparse_layers"] == ["1"]
    for key, value in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_two_processes_train_batchnorm_cnn_to_the_same_accuracy(tmp_path):
    # With BatchNorm each process normalises over its own half batch, so weights differ slightly;
    # the trained model must still be as good as the 1-process one.
    one = _run(tmp_path, "compress.zoo:digits_cnn", 1)
    two = _run(tmp_path, "compress.zoo:digits_cnn", 2)
    assert one["top1"] > 0.95
    assert abs(two["top1"] - one["top1"]) <= 0.02


DDP_RECIPE = """\
name: ddp-pipeline
model: {factory: compress.zoo:digits_cnn, kwargs: {width: 8}}
data:
  train: {source: digits, split: train}
  eval: {source: digits, split: test}
stages:
  - train: {finetune: {epochs: 3, lr: 0.05}}
  - export: {engine: {batch_sizes: [1, 4], bench_iters: 2}, check: {max_drop: 0.1, min_agreement: 0.99}}
"""


@pytest.mark.slow
def test_whole_recipe_under_torchrun_rank0_writes_a_complete_run(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(DDP_RECIPE)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "compress", "run", str(recipe), "--out", str(out), "--quiet"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("report:") == 1  # only rank 0 speaks
    report = __import__("json").loads((out / "report.json").read_text())
    assert report["passed"] and report["check"]["passed"]
    assert report["stages"][0]["metrics"]["top1"] > 0.9
    assert len(report["stages"][0]["finetune"]["history"]) == 3
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".compress-run.json", "engine.onnx", "model.onnx", "model.pt", "recipe.yaml", "report.json", "report.md",
         "report_tradeoff.png", "stages"]  # rank 0 marked the folder; no lock file is left
    )
    assert not list(out.rglob(".*.tmp"))
