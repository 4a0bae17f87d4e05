"""The TensorRT path: float16 ONNX with casts (checked in ONNX Runtime), the backend's pure parts,
its validation errors, and a real engine build that runs only where TensorRT and a CUDA GPU are.

Nothing here fakes TensorRT: the inspector summaries are tested on JSON shaped like the documented
TensorRT 10 and 11 inspector output, and the one test that builds an engine skips with the reason.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers_recipes import read_report, stage_recipe
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import compress
from compress.data import build_loader, parse_data_arg
from compress.errors import CompressError
from compress.export import tensorrt
from compress.export.fp16 import to_fp16
from compress.export.onnx import export_onnx
from compress.export.tensorrt_rules import check_tensorrt
from compress.ptq.calibrate import calibrate

TRT_MISSING = tensorrt.why_unavailable()


@pytest.fixture(scope="module")
def digits_test() -> torch.Tensor:
    batches = list(build_loader(parse_data_arg("digits:test", 512), "digits"))
    return torch.cat([b[0] for b in batches])


def _ort(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _quantized(checkpoint: Path, data: torch.Tensor) -> torch.nn.Module:
    return _quantized_model(compress.load(checkpoint).eval(), data)


def _quantized_model(model: torch.nn.Module, data: torch.Tensor) -> torch.nn.Module:
    model = compress.quant.prepare(model, "tensorrt")
    calibrate(model, [data[:256]], "max")
    return model


def _float_initializers(model: onnx.ModelProto) -> int:
    return sum(init.data_type == TensorProto.FLOAT for init in model.graph.initializer)


@pytest.mark.parametrize("quantized", [False, True])
def test_fp16_graph_runs_in_onnxruntime_and_matches_fp32(digits_cnn_checkpoint, digits_test, tmp_path, quantized):
    model = _quantized(digits_cnn_checkpoint, digits_test) if quantized else compress.load(digits_cnn_checkpoint).eval()
    fp32 = tmp_path / "model.onnx"
    export_onnx(model, digits_test[:1], fp32, opset=19, target="tensorrt" if quantized else None)
    converted, info = to_fp16(onnx.load(str(fp32)))
    fp16 = tmp_path / "model.fp16.onnx"
    onnx.save(converted, str(fp16))

    assert info.casts == 2 and info.fp32_nodes == {}  # one Cast in, one out; Q/DQ take float16 scales at opset 19
    assert _float_initializers(converted) == 0 and info.fp16_initializers > 0
    graph = converted.graph
    assert [v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]] == [TensorProto.FLOAT] * 2
    a, b = _ort(fp32, digits_test), _ort(fp16, digits_test)
    assert b.dtype == np.float32
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.99
    # ONNX Runtime's CPU may run some float16 ops in float32; ONNX's reference evaluator keeps every
    # tensor in the type the file gives it, as strongly typed TensorRT does.
    x = digits_test[:48].numpy()
    c = ReferenceEvaluator(converted).run(None, {"input": x})[0]
    assert (c.argmax(1) == a[:48].argmax(1)).mean() >= 0.97
    assert 0 < np.abs(a[:48] - c).max() < 0.05 * np.abs(a).max()  # float16 rounding, not a different model
    if quantized:
        assert check_tensorrt(converted).passed
        dq_scales = [numpy_helper.to_array(i).dtype for i in graph.initializer if "scale" in i.name.lower()
                     or i.name.startswith("onnx::")]
        assert np.float16 in dq_scales


def test_fp16_below_opset_19_keeps_quantized_ops_with_their_qdq_in_fp32(digits_cnn_checkpoint, digits_test, tmp_path):
    fp32 = tmp_path / "model.onnx"
    export_onnx(_quantized(digits_cnn_checkpoint, digits_test), digits_test[:1], fp32, opset=13, target="tensorrt")
    converted, info = to_fp16(onnx.load(str(fp32)))
    qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in converted.graph.node)
    reasons = list(info.fp32_nodes.values())
    assert sum("opset 13 < 19" in why and "runs with" not in why for why in reasons) == qdq
    weighted = [n for n in converted.graph.node if n.op_type in ("Conv", "Gemm")]
    assert all((n.name or n.output[0]) in info.fp32_nodes for n in weighted)  # INT8 ops stay with their Q/DQ
    assert check_tensorrt(converted).passed  # so no Cast separates a DequantizeLinear from its op
    onnx.save(converted, str(tmp_path / "h.onnx"))
    a, b = _ort(fp32, digits_test), _ort(tmp_path / "h.onnx", digits_test)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.99


def test_rules_flag_a_cast_between_dequantize_and_its_op():
    w = numpy_helper.from_array(np.ones((2, 2), np.int8), "w")
    nodes = [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"], name="dq"),
             helper.make_node("Cast", ["wf"], ["wh"], to=TensorProto.FLOAT16),
             helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xf"], name="dqx"),
             helper.make_node("Cast", ["xf"], ["xh"], to=TensorProto.FLOAT16),
             helper.make_node("MatMul", ["xh", "wh"], ["y"], name="mm")]
    inits = [w, numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 2])], inits)
    rules = check_tensorrt(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    assert not rules.passed and len([v for v in rules.violations if "a Cast stands between" in v]) == 2
    assert "opset >= 19" in rules.violations[0]


def test_fp16_keeps_named_ops_fp32_clamps_big_weights_and_refuses_subgraphs():
    w = numpy_helper.from_array(np.array([[1e6, 2.0], [3.0, -7e4]], np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
             helper.make_node("Softmax", ["y"], ["z"], name="sm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 2])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    converted, info = to_fp16(model, keep_fp32=["Softmax"])
    assert info.clamped == 2 and info.fp32_nodes == {"sm": "keep_fp32"}
    assert numpy_helper.to_array(converted.graph.initializer[0]).max() == np.float16(65504)
    casts = [n for n in converted.graph.node if n.op_type == "Cast"]
    assert len(casts) == 2  # x -> fp16 for the MatMul, y -> fp32 for the Softmax; z is already fp32
    x = np.array([[1e-6, 0.0]], np.float32)
    out = ort.InferenceSession(converted.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert out.dtype == np.float32 and np.isfinite(out).all()

    body = helper.make_graph([helper.make_node("Identity", ["x"], ["o"])], "b", [],
                             [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    branch = helper.make_node("If", ["c"], ["r"], then_branch=body, else_branch=body, name="branch")
    graph = helper.make_graph([branch], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                              helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)])
    with pytest.raises(CompressError, match=r"node branch \(If\) is not supported"):
        to_fp16(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8))


class _ShapeMean(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # the element count comes from the shape: 3*224*224 > 65504
        return x.sum((1, 2, 3)) / (x.shape[1] * x.shape[2] * x.shape[3])


class _Positions(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # Range (no float16 type in ONNX) and CumSum at opset 13
        return x + torch.arange(x.shape[1], dtype=torch.float32) + torch.cumsum(x, dim=1)


def test_fp16_keeps_shape_arithmetic_and_ops_without_float16_in_fp32(tmp_path):
    x = torch.rand(2, 3, 224, 224) * 0.01  # the sum (about 750) fits float16; the count 150528 does not
    export_onnx(_ShapeMean(), x, tmp_path / "mean.onnx", opset=13)
    converted, info = to_fp16(onnx.load(str(tmp_path / "mean.onnx")))
    assert any("tensor shapes" in why for why in info.fp32_nodes.values())
    exact = _ShapeMean()(x).numpy()
    assert np.allclose(ReferenceEvaluator(converted).run(None, {"input": x.numpy()})[0], exact, rtol=2e-3)

    x = torch.rand(2, 6)
    export_onnx(_Positions(), x, tmp_path / "pos.onnx", opset=13)
    converted, info = to_fp16(onnx.load(str(tmp_path / "pos.onnx")))
    reasons = set(info.fp32_nodes.values())
    assert "CumSum has no float16 type in opset 13" in reasons and any("Range" in r or "shapes" in r for r in reasons)
    assert np.allclose(ReferenceEvaluator(converted).run(None, {"input": x.numpy()})[0], _Positions()(x).numpy(),
                       rtol=2e-3, atol=2e-3)


def test_fp16_keeps_a_tiny_scale_layer_with_its_qdq_in_fp32(digits_cnn_checkpoint, digits_test, tmp_path):
    model = compress.load(digits_cnn_checkpoint).eval()
    with torch.no_grad():  # one output channel of layer1.conv1 so small its int8 scale is below float16's range
        model.layer1.conv1.weight[3] *= 1e-4
    export_onnx(_quantized_model(model, digits_test), digits_test[:1], tmp_path / "q.onnx", opset=19, target="tensorrt")
    converted, info = to_fp16(onnx.load(str(tmp_path / "q.onnx")))
    layer = [k for k in info.fp32_nodes if k.startswith("/conv1/")]  # the fx-traced export names layer1.conv1 so
    assert "/conv1/Conv" in layer and any("weight_quantizer" in k for k in layer)
    # that Conv, its weight DQ, its input Q/DQ and the Q/DQ sharing their scale (a residual add's): the rest is float16
    assert len(info.fp32_nodes) <= 8 and info.fp16_initializers > 10
    assert any("input_quantizer" in k for k in layer)  # the activation Q/DQ pair stays with its Conv
    assert check_tensorrt(converted).passed  # no Cast between any DQ and the op it feeds
    onnx.save(converted, str(tmp_path / "h.onnx"))
    from compress.sparsity import verify_onnx

    assert "layer1.conv1" in verify_onnx(tmp_path / "h.onnx").layers  # the weight is still traced through the Cast
    with pytest.raises(CompressError, match=r"keep_fp32 \['softmax'\] match no op type or node name"):
        to_fp16(onnx.load(str(tmp_path / "q.onnx")), keep_fp32=["softmax"])


def test_profile_shapes_only_the_batch_may_be_dynamic():
    profile = tensorrt.Profile(1, 8, 32)
    assert tensorrt.profile_shapes([1, 1, 8, 8], profile) is None
    assert tensorrt.profile_shapes(["batch", 1, 8, 8], profile) == ((1, 1, 8, 8), (8, 1, 8, 8), (32, 1, 8, 8))
    with pytest.raises(CompressError, match=r"input 'x' has dynamic dimensions \[0, 2\]"):
        tensorrt.profile_shapes(["batch", 1, "h", 8], profile, "x")
    with pytest.raises(CompressError, match="needs a profile"):
        tensorrt.profile_shapes([None, 3], None)
    with pytest.raises(CompressError, match="1 <= min <= opt <= max, got 4/2/8"):
        tensorrt.Profile(4, 2, 8)


def test_batches_are_cut_to_the_profile_and_padded_up_to_its_minimum():
    x = torch.arange(10.0).reshape(10, 1)
    pieces = tensorrt.split_batch(x, 4, 4)  # a fixed-batch engine of 4
    assert [(p.shape[0], n) for p, n in pieces] == [(4, 4), (4, 4), (4, 2)]
    assert torch.equal(torch.cat([p[:n] for p, n in pieces]), x) and pieces[-1][0][2:].abs().sum() == 0
    assert [(p.shape[0], n) for p, n in tensorrt.split_batch(x, 1, 32)] == [(10, 10)]


# Shaped like TensorRT's documented inspector JSON: 10.x names the data type inside "Format/Datatype",
# 11.x gives "DataType" (and "I/O Tensors" instead of "Bindings").
_TRT10 = {"Layers": [
    {"Name": "/stem.0/Conv + /stem.2/Relu", "LayerType": "CaskConvolution",
     "Inputs": [{"Name": "input", "Format/Datatype": "Row major linear FP32"}],
     "Outputs": [{"Name": "a", "Format/Datatype": "Row major linear FP32"}], "TacticName": "sm80_xmma_fprop_implicit_gemm"},
    {"Name": "/layer1/conv1/Conv", "LayerType": "CaskConvolution",
     "Inputs": [{"Name": "a_q", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
     "Outputs": [{"Name": "b", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
     "TacticName": "sm80_xmma_fprop_sparse_conv_interleaved_i8i8_i8i32_f32"},
    {"Name": "/fc/Gemm", "LayerType": "CaskGemm",
     "Inputs": [{"Name": "b", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
     "Outputs": [{"Name": "out", "Format/Datatype": "Row major linear FP32"}], "TacticName": "sm80_gemm"},
    "a plain-string layer (built without DETAILED verbosity)"],
    "Bindings": ["input", "out"]}
_TRT11 = {"Layers": [
    {"Name": "/layer1/conv1/Conv", "Inputs": [{"Name": "a_q", "DataType": "Int8", "Format": "kCHW32"}],
     "TacticName": "sm90_xmma_fprop_implicit_gemm_indexed_i8i8"},
    {"Name": "/layer1/conv2/Conv", "Inputs": [{"Name": "b", "DataType": "Half", "Format": "kHWC8"}]}],
    "I/O Tensors": [{"Name": "input", "IOMode": "Input", "DataType": "Float"}]}


def test_layer_summary_reads_tensorrt_10_and_11_inspector_json():
    ten = tensorrt.summarize_layers(_TRT10)
    assert ten["by_precision"] == {"fp16": 1, "fp32": 1, "int8": 1, "unknown": 1} and ten["layers"] == 4
    assert ten["int8_layers"] == ["/layer1/conv1/Conv"] and ten["sparse_layers"] == ["/layer1/conv1/Conv"]
    log = ["[I] (Sparsity) Layers eligible for sparse math: /layer1/conv1/Conv, /layer1/conv2/Conv",
           "[I] (Sparsity) TRT inference plan picked sparse implementation for layers: /layer1/conv2/Conv"]
    assert tensorrt.sparse_layers_from_log(log) == ["/layer1/conv2/Conv"]
    eleven = tensorrt.summarize_layers(_TRT11, tensorrt.sparse_layers_from_log(log))
    assert eleven["by_precision"] == {"fp16": 1, "int8": 1}
    assert eleven["sparse_layers"] == ["/layer1/conv2/Conv"]  # from the log; no tactic says sparse here


def _engine_stage(write_recipe, checkpoint: Path, engine: str, onnx: str = "{target: tensorrt}", pre: str = "") -> Path:
    stages = pre + f"  - export:\n      onnx: {onnx}\n      engine: {engine}\n      check: {{max_drop: 1.0}}\n"
    return stage_recipe(write_recipe, checkpoint, stages, target=None)


@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT and a CUDA GPU are present: the backend is not refused")
def test_tensorrt_backend_is_refused_at_validate_with_the_reason(write_recipe, cli, digits_cnn_checkpoint):
    result = cli("validate", _engine_stage(write_recipe, digits_cnn_checkpoint, "{backend: tensorrt}"))
    assert result.code == 2
    assert re.search(r"stages\.0\.export\.engine\.backend: tensorrt cannot run here: .+; use backend: onnxruntime",
                     result.error_line()), result.err
    assert TRT_MISSING in result.error_line()


def test_engine_options_that_do_not_apply_are_refused(write_recipe, cli, digits_cnn_checkpoint):
    cases = [
        ("{workspace_mb: 512}", "{target: tensorrt}", "", r"engine\.workspace_mb: applies to backend tensorrt, not onnxruntime"),
        ("{timing_cache: t.cache}", "{target: tensorrt}", "", r"engine\.timing_cache: applies to backend tensorrt"),
        ("{keep_fp32: [Softmax]}", "{target: tensorrt}", "", r"engine\.keep_fp32: only means something with precision: fp16"),
        ("{precision: fp16}", "{target: tensorrt, opset: 13}", "  - ptq: {calibrator: max}\n",
         r"engine\.precision: fp16 on a quantized model needs onnx\.opset >= 19"),
        ("{precision: fp8}", "{target: tensorrt}", "", r"engine\.precision"),
        ("{precision: fp16}", "{target: tensorrt, opset: 19}", "  - ptq: {calibrator: max}\n",
         r"engine\.optimization: ONNX Runtime's CPU graph optimizations miscompute float16 Q/DQ graphs"),
        ("{precision: fp16, optimization: disabled}\n      triton: {name: m}", "{target: tensorrt, opset: 19}",
         "  - ptq: {calibrator: max}\n", r"export\.triton: Triton's ONNX Runtime backend would serve the float16"),
    ]
    for engine, onnx_opts, pre, expected in cases:
        result = cli("validate", _engine_stage(write_recipe, digits_cnn_checkpoint, engine, onnx_opts, pre))
        assert result.code == 2 and re.search(expected, result.error_line()), (engine, result.err)


def test_fp16_engine_run_checks_against_the_model(write_recipe, cli, digits_cnn_checkpoint, tmp_path):
    recipe = _engine_stage(write_recipe, digits_cnn_checkpoint, "{precision: fp16, optimization: disabled, batch_sizes: [1], bench_iters: 2}",
                           "{target: tensorrt, opset: 19}", "  - ptq: {calibrator: max}\n")
    out = tmp_path / "run"
    result = cli("run", recipe, "--out", out, "--quiet")
    assert result.code == 0, result.err
    report = read_report(out)
    fp16 = report["export"]["fp16"]
    assert fp16["onnx"] == "model.fp16.onnx" and fp16["opset"] == 19 and fp16["casts"] == 2
    assert fp16["tensorrt_rules"]["passed"] and fp16["tensorrt_rules"]["checked_ops"] >= 5
    assert report["engine"]["precision"] == "fp16" and report["engine"]["source"] == "model.fp16.onnx"
    assert report["check"]["passed"] and report["check"]["agreement"] >= 0.99
    assert report["check"]["engine_vs_onnx"]["max_abs"] > 0  # the engine really ran float16, not the fp32 file
    converted = onnx.load(str(out / "model.fp16.onnx"))
    assert _float_initializers(converted) == 0
    assert report["provenance"]["files"]["fp16_onnx"]["path"].endswith("model.fp16.onnx")


def test_engine_files_need_tensorrt_in_bench_and_check(cli, digits_cnn_checkpoint, tmp_path):
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"not an engine")
    expected = r"engine .*engine\.plan: TensorRT cannot (run here|load it)"
    for args in (("bench", plan, "--input-shape", "1,8,8"),
                 ("check", plan, "--reference", digits_cnn_checkpoint, "--data", "digits:test")):
        result = cli(*args)
        assert result.code == 2 and re.search(expected, result.error_line()), result.err


def test_backend_modules_type_check():
    pytest.importorskip("mypy", reason="mypy is in the dev extra: pip install -e '.[dev]'")
    root = Path(__file__).resolve().parents[2]
    files = [root / "compress" / "export" / f for f in ("tensorrt.py", "fp16.py", "bench.py", "triton.py", "check.py")]
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--ignore-missing-imports", "--follow-imports=silent", "--disallow-untyped-defs",
         "--warn-unused-ignores", "--warn-return-any", "--no-implicit-optional", "--cache-dir",
         str(root / ".mypy_cache"), *map(str, files)],
        capture_output=True, text=True, cwd=root, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(TRT_MISSING is not None, reason=f"needs TensorRT and a CUDA GPU: {TRT_MISSING}")
def test_tensorrt_builds_a_sparse_int8_engine_that_agrees_with_onnxruntime(write_recipe, cli, digits_cnn_checkpoint,
                                                                          tmp_path):
    recipe = _engine_stage(
        write_recipe, digits_cnn_checkpoint,
        "{backend: tensorrt, batch_sizes: [1, 8], bench_iters: 5, profile: {min: 1, opt: 8, max: 64}}",
        "{target: tensorrt}",
        "  - sparsity: {finetune: {epochs: 1}}\n  - ptq: {calibrator: max}\n",
    )
    out = tmp_path / "run"
    result = cli("run", recipe, "--out", out, "--quiet")
    assert result.code == 0, result.err
    report = read_report(out)
    built = report["engine"]["tensorrt"]
    assert report["engine"]["path"] == "engine.plan" and (out / "engine.plan").stat().st_size > 0
    assert built["strongly_typed"] and built["sparse_weights"]
    assert built["profile"]["input"] == [[1, 1, 8, 8], [8, 1, 8, 8], [64, 1, 8, 8]]
    assert (out / "timing.cache").stat().st_size > 0
    layers = json.loads((out / "engine.layers.json").read_text())
    assert built["layers"]["layers"] == len(layers["Layers"]) and built["layers"]["int8_layers"]
    assert report["check"]["passed"] and report["check"]["engine_vs_onnx"]["agreement"] >= 0.99
    shutil.copy(out / "engine.plan", tmp_path / "copy.plan")
    again = cli("check", tmp_path / "copy.plan", "--reference", out / "model.onnx", "--data", "digits:test",
                "--min-agreement", "0.99", "--report", tmp_path / "c.json")
    assert again.code == 0, again.err
