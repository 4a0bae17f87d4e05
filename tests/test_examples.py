"""The scripts under examples/ run as the README shows them."""

import os
import re
import subprocess
import sys
from pathlib import Path

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
