"""Quantized export: Q/DQ graphs per target, TensorRT rules, ONNX Runtime INT8 kernels, agreement."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from helpers_errors import one_line_error
from helpers_quant import digits
from onnx import TensorProto, helper, numpy_helper

import compress
from compress import metrics, ptq, quant
from compress.errors import CompressError
from compress.export.onnx import export_onnx
from compress.export.onnxruntime import Optimization, OrtEngine, build_engine, int8_summary
from compress.export.tensorrt_rules import check_tensorrt


@pytest.fixture(scope="module")
def calibrated(digits_cnn_checkpoint):
    """``{target: calibrated fake-quant digits_cnn}`` (percentile, 512 samples)."""
    out = {}
    for target in quant.Target:
        qmodel = quant.prepare(compress.load(digits_cnn_checkpoint), target)
        ptq.calibrate(qmodel, digits("train"), "percentile", limit=512)
        out[target.value] = qmodel.eval()
    return out


def _ops(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_tensorrt_export_follows_the_rules_with_int8_weights(calibrated, tmp_path) -> None:
    x = next(iter(digits("test")))[0]
    info = export_onnx(calibrated["tensorrt"], x[:1], tmp_path / "m.onnx", target="tensorrt")
    assert info.opset == 13 and info.target == "tensorrt"
    assert info.rules is not None and info.rules.passed, info.rules.violations
    assert info.rules.checked_ops == 7 and info.int8_weights == 7  # 6 convs + fc
    assert info.qdq_pairs == 9  # 7 layer inputs + 2 residual identities
    model = onnx.load(str(tmp_path / "m.onnx"))
    ops = _ops(tmp_path / "m.onnx")
    assert "BatchNormalization" not in ops and ops["Conv"] == 6
    weights = [t for t in model.graph.initializer if t.data_type == TensorProto.INT8]
    assert len(weights) == 7 and not [t for t in model.graph.initializer if t.name.endswith(".weight")]


def test_the_onnx_in_onnxruntime_agrees_with_the_fake_quant_model(calibrated, tmp_path) -> None:
    loader = digits("test")
    for target, qmodel in calibrated.items():
        export_onnx(qmodel, next(iter(loader))[0][:1], tmp_path / f"{target}.onnx")
        raw = OrtEngine(tmp_path / f"{target}.onnx", level=Optimization.disabled)
        engine = build_engine(tmp_path / f"{target}.onnx", tmp_path / f"{target}.engine.onnx")
        ref, onnx_out, engine_out = metrics.collect_many([qmodel, raw, engine], loader)
        for out in (onnx_out, engine_out):
            fid = metrics.fidelity(out.logits, ref.logits)
            assert fid["agreement"] >= 0.995 and fid["cosine"] > 0.9999, (target, fid)
        if target == "tensorrt":  # Q/DQ run as float ops: torch's arithmetic, except rounding ties moved
            diff = (onnx_out.logits - ref.logits).abs()  # one step by float error (BN folding, conv order)
            assert float(diff.mean()) < 1e-3 and float(diff.max()) < 0.01 * float(ref.logits.abs().max())


def test_onnxruntime_target_runs_every_weighted_op_in_int8(calibrated, tmp_path) -> None:
    x = next(iter(digits("test")))[0]
    info = export_onnx(calibrated["onnxruntime"], x[:1], tmp_path / "m.onnx")
    assert info.int32_biases == 7 and info.rules is None
    build_engine(tmp_path / "m.onnx", tmp_path / "engine.onnx")
    summary = int8_summary(tmp_path / "engine.onnx")
    assert summary["int8_weighted_fraction"] == 1.0
    assert summary["int8_ops"]["QLinearConv"] == 6 and summary["int8_ops"]["QGemm"] == 1
    assert summary["int8_ops"]["QLinearAdd"] == 2
    trt_engine = tmp_path / "trt_engine.onnx"
    export_onnx(calibrated["tensorrt"], x[:1], tmp_path / "trt.onnx")
    build_engine(tmp_path / "trt.onnx", trt_engine)
    assert int8_summary(trt_engine)["int8_weighted_fraction"] < 0.5  # the placement is what makes the difference


def test_export_refuses_uncalibrated_and_mismatched_models(digits_cnn_checkpoint, calibrated, tmp_path) -> None:
    x = torch.zeros(1, 1, 8, 8)
    raw = quant.prepare(compress.load(digits_cnn_checkpoint), "tensorrt")
    msg = one_line_error(CompressError, export_onnx, raw, x, tmp_path / "a.onnx")
    assert "never calibrated" in msg and "stem.0.input_quantizer" in msg
    # another target is placed at export time; the tensors TensorRT never quantized need calibration batches
    msg = one_line_error(CompressError, export_onnx, calibrated["tensorrt"], x, tmp_path / "b.onnx", target="onnxruntime")
    assert "act_quant.layer1_bn2_out" in msg and "calibration=loader" in msg
    assert not list(tmp_path.iterdir())  # nothing written


def test_one_quantized_model_exports_for_either_target(calibrated, tmp_path) -> None:
    loader = digits("test")
    x = next(iter(loader))[0]
    trt = calibrated["onnxruntime"]  # quantized for ONNX Runtime, exported for TensorRT: no data needed
    info = export_onnx(trt, x[:1], tmp_path / "trt.onnx", target="tensorrt")
    assert info.target == "tensorrt" and info.rules is not None and info.rules.passed, info.rules
    assert info.qdq_pairs == 9 and info.int8_weights == 7  # as the model quantized for TensorRT exports
    assert compress.quant.target_of(trt).value == "onnxruntime"  # the model itself is left as it was
    info = export_onnx(calibrated["tensorrt"], x[:1], tmp_path / "ort.onnx", target="onnxruntime",
                       calibration=digits("train"))
    assert info.target == "onnxruntime" and info.int32_biases == 7
    build_engine(tmp_path / "ort.onnx", tmp_path / "ort.engine.onnx")
    summary = int8_summary(tmp_path / "ort.engine.onnx")
    assert summary["int8_weighted_fraction"] == 1.0 and summary["int8_ops"]["QLinearAdd"] == 2
    # each export agrees with the fake-quant model it came from; the activation storage type changed,
    # so agreement (not bit equality) is the measure, at the bar the native exports meet above
    for path, ref in (("trt.onnx", calibrated["onnxruntime"]), ("ort.engine.onnx", calibrated["tensorrt"])):
        want, got = metrics.collect_many([ref, OrtEngine(tmp_path / path, level=Optimization.disabled)], loader)
        fid = metrics.fidelity(got.logits, want.logits)
        assert fid["agreement"] >= 0.99 and fid["cosine"] > 0.999, (path, fid)


def _graph(nodes, inits, opset: int = 13) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _conv_graph(*, act_zero: int = 0, act_dtype=np.int8, weight_axis: int = 0, act_scale=None, dangling=False):
    inits = [
        numpy_helper.from_array(np.array(0.1, np.float32), "s"),
        numpy_helper.from_array(np.array(act_zero, act_dtype), "z"),
        numpy_helper.from_array(np.ones((3, 2, 1, 1), np.int8), "w"),
        numpy_helper.from_array(np.full(3 if weight_axis == 0 else 2, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(3 if weight_axis == 0 else 2, np.int8), "wz"),
    ]
    if act_scale is not None:
        inits[0] = numpy_helper.from_array(np.asarray(act_scale, np.float32), "s")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=weight_axis),
        helper.make_node("Conv", ["xd", "wd"], ["y"]),
    ]
    if dangling:
        nodes.append(helper.make_node("QuantizeLinear", ["y", "s", "z"], ["lost"]))
    return _graph(nodes, inits)


def test_rules_checker_accepts_a_good_graph_and_names_each_violation() -> None:
    assert check_tensorrt(_conv_graph()).passed
    cases = {
        "zero point must be 0": _conv_graph(act_zero=3),
        "zero point is not int8": _conv_graph(act_dtype=np.uint8),
        "per-channel axis 1": _conv_graph(weight_axis=1),
        "scale must be finite and > 0": _conv_graph(act_scale=-0.1),
        "per-channel scales on an activation": _conv_graph(act_scale=[0.1, 0.1]),
        "output does not go (only) to DequantizeLinear": _conv_graph(dangling=True),
    }
    for expected, model in cases.items():
        report = check_tensorrt(model)
        assert not report.passed and any(expected in v for v in report.violations), (expected, report.violations)
    w = numpy_helper.from_array(np.ones((3, 2, 1, 1), np.float32), "w")
    report = check_tensorrt(_graph([helper.make_node("Conv", ["x", "w"], ["y"])], [w]))
    assert report.passed and (report.checked_ops, report.float_ops) == (0, 1)  # left in float on purpose
    half = _conv_graph()
    half.graph.initializer.append(w)
    half.graph.node[3].input[1] = "w"  # quantized data, float weight: TensorRT cannot run that in INT8
    del half.graph.node[2]
    report = check_tensorrt(half)
    assert report.violations == ["Conv y: weight input 'w' is not fed by DequantizeLinear"]


def test_float_export_is_unchanged_by_quantization_support(digits_cnn_checkpoint, tmp_path) -> None:
    model = compress.load(digits_cnn_checkpoint)
    info = export_onnx(copy.deepcopy(model), torch.zeros(1, 1, 8, 8), tmp_path / "f.onnx", target="onnxruntime")
    assert info.qdq_pairs == 0 and info.int8_weights == 0 and info.rules is None
    assert "QuantizeLinear" not in _ops(tmp_path / "f.onnx")


class _ConvFc(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class _Twice(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(self.conv(x)))


def test_rules_accept_layers_left_in_float_and_linear_on_sequences(tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    qmodel = quant.prepare(_ConvFc(), "tensorrt", exclude=["conv"])
    ptq.calibrate(qmodel, [x])
    rules = export_onnx(qmodel.eval(), x[:1], tmp_path / "a.onnx").rules
    assert rules is not None and rules.passed and (rules.checked_ops, rules.float_ops) == (1, 1)
    seq = quant.prepare(torch.nn.Sequential(torch.nn.Linear(8, 8)), "tensorrt")
    tokens = torch.randn(16, 5, 8)  # (batch, tokens, features): exports as DQ -> Transpose -> MatMul
    ptq.calibrate(seq, [tokens])
    rules = export_onnx(seq.eval(), tokens[:1], tmp_path / "b.onnx").rules
    assert rules is not None and rules.passed and rules.checked_ops == 1


def test_onnxruntime_export_of_a_shared_layer_and_of_an_unrepresentable_bias(tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 4, 8, 8)
    qmodel = quant.prepare(_Twice(), "onnxruntime")
    ptq.calibrate(qmodel, [x])
    info = export_onnx(qmodel.eval(), x[:1], tmp_path / "twice.onnx")
    assert info.int32_biases == 2  # one per call: each has its own input scale
    model = _ConvFc()
    with torch.no_grad():
        model.conv.weight[0].fill_(1e-9)  # int32 bias = 5 / (s_x * 1e-9 / 127) overflows
        model.conv.bias[0] = 5.0
    qmodel = quant.prepare(model, "onnxruntime")
    ptq.calibrate(qmodel, [torch.randn(16, 1, 8, 8)])
    info = export_onnx(qmodel.eval(), torch.zeros(1, 1, 8, 8), tmp_path / "big_bias.onnx")
    assert info.int32_biases == 1  # the conv keeps its float bias instead of a clipped one
    raw = OrtEngine(tmp_path / "big_bias.onnx", level=Optimization.disabled)
    probe = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert float((raw(probe) - qmodel(probe)).abs().max()) < 0.05
