"""INT8 attention: nn.MultiheadAttention split into quantizable projections, Q/DQ on both attention MatMuls."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

import compress
from compress import quant
from compress.export.onnx import export_onnx
from compress.export.tensorrt_rules import check_tensorrt
from compress.ptq.calibrate import calibrate
from compress.quant.attention import QuantMultiheadAttention


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().pow(2).mean().sqrt())


def _vit() -> nn.Module:
    """The tiny torchvision ViT with a random (not zero-initialised) head and class token, so outputs differ."""
    torch.manual_seed(0)
    model = compress.build("helpers_vit:tiny_vit").eval()  # recorded, so a quantized copy saves and reloads
    torch.manual_seed(1)
    nn.init.normal_(model.heads.head.weight, std=0.2)
    nn.init.normal_(model.class_token, std=0.5)
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(32, 3, 32, 32)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "bool", "float"])
def test_the_split_module_is_the_module_it_replaces(batch_first: bool, masks: str) -> None:
    """Same weights, same function. Bound: 1e-5 of the output RMS — only the float32 summation order of the split
    projections differs (measured ~1e-7); a wrong head split, scale or mask moves outputs by about the RMS."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first, kdim=24, vdim=20).eval()
    n, length, source = 3, 5, 7
    shape = (lambda t: (n, t)) if batch_first else (lambda t: (t, n))
    q, k, v = torch.randn(*shape(length), 32), torch.randn(*shape(source), 24), torch.randn(*shape(source), 20)
    kwargs: dict = {}
    if masks == "bool":
        kwargs = {"key_padding_mask": torch.tensor([[False] * 7, [False] * 5 + [True] * 2, [False] * 6 + [True]]),
                  "attn_mask": torch.rand(length, source) > 0.8}
        kwargs["attn_mask"][:, 0] = False  # every query keeps a key
    elif masks == "float":
        kwargs = {"attn_mask": torch.randn(n * 4, length, source)}
    split = QuantMultiheadAttention(mha, None, "mha")
    for average in (True, False):
        want_out, want_w = mha(q, k, v, average_attn_weights=average, **kwargs)
        got_out, got_w = split(q, k, v, average_attn_weights=average, **kwargs)
        assert (got_out - want_out).abs().max() <= 1e-5 * _rms(want_out)
        assert (got_w - want_w).abs().max() <= 1e-5  # probabilities: values in [0, 1]
    assert split(q, k, v, need_weights=False, **kwargs)[1] is None
    if masks == "none":
        with pytest.raises(ValueError, match="batched \\(3-d\\) inputs only, got a 2-d query"):
            split(q[0], k[0], v[0])


def test_prepare_quantizes_projections_and_both_attention_matmuls_and_leaves_the_float_model(images) -> None:
    model = _vit()
    keys = set(model.state_dict())
    qmodel = quant.prepare(model, "tensorrt")
    plan = quant.plan_of(qmodel)
    assert plan.attention == [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]
    layers = dict(quant.quant_layers(qmodel))
    for i in range(2):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert f"encoder.layers.encoder_layer_{i}.self_attention.{proj}" in layers
    quantizers = [n for n, _ in quant.quantizers(qmodel)]
    assert sum(n.endswith(("q_quantizer", "k_quantizer", "probs_quantizer", "v_quantizer")) for n in quantizers) == 8
    assert len(plan.layers) == 14  # conv_proj, 2 x (4 projections + 2 MLP), head
    assert plan.kept_float == {"LayerNorm": 5, "GELU": 2, "Softmax": 2}
    # the user's float model is untouched: still nn.MultiheadAttention, same state_dict keys
    assert type(model.encoder.layers.encoder_layer_0.self_attention) is nn.MultiheadAttention
    assert set(model.state_dict()) == keys
    float_out = model(images)
    for _, q in quant.quantizers(qmodel):
        q.quant_enabled = False
    assert (qmodel(images) - float_out).abs().max() <= 1e-5 * _rms(float_out)


def _calibrated(target: str, images: torch.Tensor, **options: str) -> nn.Module:
    qmodel = quant.prepare(_vit(), target, **options).eval()
    calibrate(qmodel, [images[i:i + 8] for i in range(0, len(images), 8)], "max")
    return qmodel


def _producers(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in proto.graph.node for o in n.output}


def test_tensorrt_export_feeds_each_attention_matmul_from_dequantize_linear(images, tmp_path) -> None:
    qmodel = _calibrated("tensorrt", images)
    info = export_onnx(qmodel, images[:1], tmp_path / "m.onnx", opset=13, target="tensorrt")
    assert info.opset == 13 and info.rules is not None and info.rules.passed, info.rules
    assert info.rules.attention_matmuls == 4  # 2 layers x (Q·Kᵀ, softmax·V)
    proto = onnx.load(tmp_path / "m.onnx")
    producer = _producers(proto)
    both = [n for n in proto.graph.node if n.op_type == "MatMul"
            and all(producer[i].op_type == "DequantizeLinear" for i in n.input)]
    assert len(both) == 4
    softmax_fed = [n for n in both if producer[producer[producer[n.input[0]].input[0]].input[0]].op_type == "Softmax"]
    assert len(softmax_fed) == 2  # Softmax -> Q -> DQ -> MatMul
    scaled = [n for n in both if producer[producer[producer[n.input[0]].input[0]].input[0]].op_type == "Mul"]
    assert len(scaled) == 2  # the 1/sqrt(d) scale sits on the Q side, before its Q/DQ
    # ONNX Runtime runs the Q/DQ graph as the fake-quantized model computes it, up to float32 summation order
    # (1e-4 of RMS). Where that order moves a value across a rounding boundary, one int8 step flips and the sample
    # moves by about a step of the layers after it: allow 2 such samples of 32, each within 10% of the RMS.
    want = qmodel(images).detach().numpy()
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    error = np.abs(sess.run(None, {sess.get_inputs()[0].name: images.numpy()})[0] - want).max(axis=1)
    rms = float(np.sqrt((want ** 2).mean()))
    assert (error > 1e-4 * rms).sum() <= 2 and error.max() <= 0.1 * rms, error


def test_onnxruntime_runs_every_matmul_on_integer_kernels(images, tmp_path) -> None:
    qmodel = _calibrated("onnxruntime", images)
    export_onnx(qmodel, images[:1], tmp_path / "m.onnx", opset=13, target="onnxruntime")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")  # the default level (all), as users run it
    ort.InferenceSession(str(tmp_path / "m.onnx"), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node)
    # 2 layers x (q, k, v, out, 2 MLP, 2 attention MatMuls): every MatMul of the encoder on integer kernels
    assert ops["MatMulIntegerToFloat"] == 16 and ops["MatMul"] == 0, ops


def test_attention_float_keeps_the_attention_matmuls_float(images, tmp_path) -> None:
    qmodel = _calibrated("tensorrt", images, attention="float")
    names = [n for n, _ in quant.quantizers(qmodel)]
    assert not any(n.endswith("probs_quantizer") for n in names)
    assert "encoder.layers.encoder_layer_0.self_attention.q_proj.weight_quantizer" in names
    info = export_onnx(qmodel, images[:1], tmp_path / "m.onnx", opset=13, target="tensorrt")
    assert info.rules.passed and info.rules.attention_matmuls == 0 and info.rules.float_ops == 4


def test_attention_fused_leaves_multihead_attention_alone(images) -> None:
    qmodel = quant.prepare(_vit(), "tensorrt", attention="fused")
    plan = quant.plan_of(qmodel)
    assert plan.attention == [] and len(plan.layers) == 6
    assert {reason for reason, _ in plan.skipped.values()} == {quant.insert.Skip.excluded}


def test_a_quantized_checkpoint_rebuilds_the_split_attention(images, tmp_path) -> None:
    qmodel = _calibrated("tensorrt", images)
    compress.save(qmodel, tmp_path / "q.pt")
    again = compress.load(tmp_path / "q.pt", trust=["helpers_vit"])
    assert quant.plan_of(again).attention == quant.plan_of(qmodel).attention
    assert torch.equal(again(images), qmodel(images))


def test_rules_flag_a_transpose_between_dequantize_and_an_attention_matmul() -> None:
    """Q/DQ on K and then Kᵀ: TensorRT's fused attention wants DQ to feed the MatMul."""
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    zero = helper.make_tensor("z", TensorProto.INT8, [], [0])
    nodes = []
    for name in ("q", "k"):
        nodes += [helper.make_node("QuantizeLinear", [name, "s", "z"], [f"{name}_q"]),
                  helper.make_node("DequantizeLinear", [f"{name}_q", "s", "z"], [f"{name}_dq"])]
    nodes += [helper.make_node("Transpose", ["k_dq"], ["kt"], perm=[0, 2, 1]),
              helper.make_node("MatMul", ["q_dq", "kt"], ["scores"], name="scores")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 8]) for n in "qk"],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 4, 4])], [scale, zero])
    report = check_tensorrt(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    assert not report.passed and report.attention_matmuls == 1
    assert any("attention MatMul input 1 reaches it through a Transpose" in v for v in report.violations)


def test_a_deep_copy_keeps_the_target_and_attention_mode() -> None:
    """copy.deepcopy rebuilds an fx GraphModule from its graph; the quantization settings must survive it."""
    import copy

    qmodel = quant.prepare(_vit(), "onnxruntime", attention="float")
    twin = copy.deepcopy(qmodel)
    assert quant.target_of(twin) is quant.Target.onnxruntime and quant.attention_mode(twin) is quant.Attention.float
    assert quant.plan_of(twin).layers == quant.plan_of(qmodel).layers
