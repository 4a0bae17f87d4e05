"""The scripts under examples/ run as the README shows them."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_distill_example_trains_a_student_in_a_plain_pytorch_loop():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "examples/distill_digits.py"), "--epochs", "3"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kd = [float(v) for v in re.findall(r"kd_loss ([0-9.]+)", proc.stdout)]
    assert len(kd) == 3 and kd[-1] < kd[0]
    teacher = float(re.search(r"teacher top1 ([0-9.]+)", proc.stdout).group(1))
    student = float(re.search(r"student top1 ([0-9.]+)", proc.stdout).group(1))
    assert teacher >= 0.97 and student >= 0.9


@pytest.mark.slow
def test_qat_sparse_example_trains_in_a_plain_loop_and_restores_onto_a_fresh_torchvision_model(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "examples/qat_sparse_own_loop.py"), "--steps", "6",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    losses = [float(v) for v in re.findall(r"step \d+ loss ([0-9.]+)", proc.stdout)]
    assert len(losses) == 2 and losses[1] < losses[0]  # it trained
    assert "sparse layers 19/19 after training" in proc.stdout  # resnet18: every eligible conv kept 2:4
    assert "identical outputs True" in proc.stdout
    assert re.search(r"tensorrt rules pass, 19 2:4 layers", proc.stdout), proc.stdout
    assert (tmp_path / "qat_sparse.pt").is_file() and (tmp_path / "qat_sparse.onnx").is_file()
