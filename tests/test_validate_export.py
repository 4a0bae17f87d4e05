"""``compress validate`` (and ``run``, before any stage trains) tries the export stage's export: a model the
exporter cannot write fails in one line naming the op and the opset, with nothing on stdout (``--json`` stays JSON)."""

from __future__ import annotations

import json

from compress.cli import main as cli_main

UNEXPORTABLE = """\
name: unexportable
model:
  factory: helpers_unexportable:triu_digits
data:
  train: {source: digits, split: train, limit: 128}
  eval: {source: digits, split: test}
stages:
  - train:
      finetune: {epochs: 1, lr: 0.05}
  - export:
      onnx: {opset: 13, target: onnxruntime}
      engine: {batch_sizes: [1], bench_iters: 2}
"""

VIT = """\
name: vit
model:
  factory: helpers_vit:tiny_vit
data:
  train: {source: digits, split: train, size: 32, channels: 3, limit: 64}
  eval: {source: digits, split: test, size: 32, channels: 3, limit: 64}
stages:
  - export:
      onnx: {opset: 13, target: tensorrt}
      engine: {batch_sizes: [1], bench_iters: 2}
"""

WHY = ("stages.1.export.onnx: the input model does not export: aten::triu has no ONNX export at opset 13; the "
       "exporter has it from opset 14: set the opset to 14 (recipe: onnx.opset) or replace aten::triu in the model")


def _cli(capfd, *args: object) -> tuple[int, str, str]:
    """Run the CLI in-process; stdout/stderr read at the file-descriptor level (C++ prints included)."""
    capfd.readouterr()
    code = cli_main([str(a) for a in args])
    out, err = capfd.readouterr()
    return code, out, err


def test_validate_names_the_op_and_opset_in_one_line_and_prints_nothing_on_stdout(write_recipe, capfd) -> None:
    recipe = write_recipe(UNEXPORTABLE)
    code, out, err = _cli(capfd, "validate", recipe, "--json", "--quiet")
    assert code == 2
    assert out == ""  # no TorchScript IR (the exporter prints ~60 KB of it on this failure)
    assert err.splitlines() == [f"compress: error: {recipe}:10 {WHY}"]


def test_run_fails_before_the_train_stage_trains(write_recipe, tmp_path, capfd) -> None:
    recipe = write_recipe(UNEXPORTABLE)
    code, out, err = _cli(capfd, "run", recipe, "--out", tmp_path / "run", "--json", "--quiet")
    assert (code, out) == (2, "")
    assert err.splitlines() == [f"compress: error: {recipe}:10 {WHY}"]
    assert not (tmp_path / "run" / "stages").exists()


def test_the_opset_the_error_names_validates(write_recipe, capfd) -> None:
    recipe = write_recipe(UNEXPORTABLE)
    code, out, err = _cli(capfd, "validate", recipe, "--json", "--quiet", "--set", "stages.1.export.onnx.opset=14")
    assert code == 0, err
    assert json.loads(out)["recipe"]["stages"][1]["export"]["onnx"]["opset"] == 14


def test_a_vit_validates_at_opset_13_with_json_on_stdout(write_recipe, capfd) -> None:
    code, out, err = _cli(capfd, "validate", write_recipe(VIT), "--json", "--quiet")
    assert code == 0, err
    assert json.loads(out)["recipe"]["name"] == "vit"
