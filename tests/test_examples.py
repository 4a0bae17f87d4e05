"""The scripts under examples/ run as the docs show them (each in a subprocess, with small sizes)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

ROOT = Path(__file__).parents[1]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_distill_example_trains_a_student_in_a_plain_pytorch_loop():
    env = {**os.environ, "PYTHONPATH": str(ROOT), **ONE_THREAD}
    proc = subprocess.run([sys.executable, str(ROOT / "examples/distill_digits.py"), "--epochs", "3"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kd = [float(v) for v in re.findall(r"kd_loss ([0-9.]+)", proc.stdout)]
    assert len(kd) == 3 and kd[-1] < kd[0]
    teacher = float(re.search(r"teacher top1 ([0-9.]+)", proc.stdout).group(1))
    student = float(re.search(r"student top1 ([0-9.]+)", proc.stdout).group(1))
    assert teacher >= 0.97 and student >= 0.9


def _run(script: str, *args: str, timeout: int = 600) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **ONE_THREAD}  # see tests/test_docs.py: threads on a shared machine
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def _check_line(stdout: str) -> tuple[float, float, float]:
    found = re.search(r"check: top1 ([0-9.]+) \(float ([0-9.]+)\), drop (-?[0-9.]+) pt, agreement ([0-9.]+), "
                      r"passed True", stdout)
    assert found, stdout
    return float(found.group(1)), float(found.group(2)), float(found.group(4))


@pytest.mark.slow
def test_own_torchvision_model_example_prunes_quantizes_exports_and_checks(tmp_path) -> None:
    """resnet18(num_classes=10) the user builds, on generated 16x16 data: prune -> PTQ -> ONNX -> check vs float."""
    out = _run("own_torchvision_model.py", "--out", str(tmp_path), "--samples", "512", "--epochs", "1")
    int8, float_, _ = _check_line(out)
    # 512 test samples, 10 classes (chance 0.1); measured: float 0.92-0.96, the pruned INT8 engine 0.93-0.98.
    assert float_ > 0.5 and int8 > 0.5
    assert "reloaded outputs identical: True" in out
    proto = onnx.load(tmp_path / "model_int8.onnx")
    assert sum(n.op_type == "DequantizeLinear" for n in proto.graph.node) > 20  # every conv and the fc quantized


@pytest.mark.slow
def test_huggingface_bert_example_quantizes_token_inputs_and_checks(tmp_path) -> None:
    """A BERT from transformers.BertConfig on token ids + attention mask: PTQ -> opset-13 ONNX -> check vs float."""
    pytest.importorskip("transformers")
    out = _run("huggingface_bert.py", "--out", str(tmp_path), "--epochs", "6", "--samples", "1024")
    int8, float_, agreement = _check_line(out)
    # 4 topics (chance 0.25) on 512 test sentences; the check itself holds the drop to 2 pt (10 sentences).
    assert float_ > 0.5 and agreement > 0.95
    proto = onnx.load(tmp_path / "bert_int8.onnx")
    assert [(i.name, i.type.tensor_type.elem_type) for i in proto.graph.input] == [
        ("input_ids", onnx.TensorProto.INT64), ("attention_mask", onnx.TensorProto.INT64)]
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 13
