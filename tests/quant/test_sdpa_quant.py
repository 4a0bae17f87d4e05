"""INT8 attention for models calling ``F.scaled_dot_product_attention`` themselves: timm ViT (traces with torch.fx),
Hugging Face ViT and BERT (do not trace; BERT fed int64 token ids). Tiny models from tests/helpers_sdpa.py."""

from __future__ import annotations

import collections
import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import compress
from compress import quant
from compress.errors import DataError
from compress.export.onnx import export_onnx
from compress.ptq.calibrate import calibrate
from compress.quant.quantizer import TensorQuantizer
from compress.quant.sdpa import find_sites
from compress.quant.spec import Target, activation_spec

pytest.importorskip("timm")
pytest.importorskip("transformers")

SITES = {
    "timm_vit": [f"blocks.{i}.attn" for i in range(2)],
    "hf_vit": [f"model.vit.layers.{i}.attention" for i in range(2)],
    "hf_bert": [f"model.bert.encoder.layer.{i}.attention.self" for i in range(2)],
}


def _inputs(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if name == "hf_bert":
        return torch.randint(0, 100, (32, 12), generator=g)  # int64 token ids
    return torch.randn(32, 3, 32, 32, generator=g)


def _model(name: str) -> nn.Module:
    return compress.build(f"helpers_sdpa:{name}").eval()  # recorded, so a quantized copy saves and reloads


def _calibrated(name: str, target: str = "tensorrt", **options: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    model, x = _model(name), _inputs(name)
    qmodel = quant.prepare(model, target, example_input=x[:2], **options).eval()
    calibrate(qmodel, [x[i:i + 8] for i in range(0, len(x), 8)], "max")
    return model, qmodel, x


def _sdpa_quantizers(model: nn.Module) -> list[str]:
    return [n for n, _ in quant.quantizers(model) if ".sdpa_quant." in n]


@pytest.mark.parametrize("name", SITES)
def test_prepare_finds_each_attention_and_leaves_the_float_model(name: str) -> None:
    model, x = _model(name), _inputs(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    with torch.no_grad():
        float_out = model(x)
    qmodel = quant.prepare(model, "tensorrt", example_input=x[:2])
    plan = quant.plan_of(qmodel)
    assert plan.sdpa == SITES[name]
    assert len(_sdpa_quantizers(qmodel)) == 4 * 2  # Q, Kᵀ, probs, V per layer
    assert plan.kept_float["Softmax"] == 2
    # the float model is as it was: same modules, same tensors, no routed forward, same function
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and set(before) == set(model.state_dict())
    assert not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), float_out)
        for _, q in quant.quantizers(qmodel):  # quantization off: the written-out attention computes SDPA's function
            q.quant_enabled = False
        # float32 summation order only (Q-side scale, the fused kernel): measured <= 3e-6 of RMS; a wrong scale or
        # head split moves outputs by O(RMS)
        assert (qmodel(x) - float_out).abs().max() <= 1e-4 * float_out.pow(2).mean().sqrt()


def _producers(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in proto.graph.node for o in n.output}


@pytest.mark.parametrize("name", SITES)
def test_tensorrt_export_feeds_both_attention_matmuls_from_dequantize_linear(name: str, tmp_path) -> None:
    _, qmodel, x = _calibrated(name)
    info = export_onnx(qmodel, x[:1], tmp_path / "m.onnx", opset=13, target="tensorrt")
    assert info.opset == 13 and info.rules is not None and info.rules.passed, info.rules
    assert info.rules.attention_matmuls == 2 * 2  # 2 layers x (Q·Kᵀ, softmax·V)
    proto = onnx.load(tmp_path / "m.onnx")
    producer = _producers(proto)
    both = [n for n in proto.graph.node if n.op_type == "MatMul" and all(
        i in producer and producer[i].op_type == "DequantizeLinear" for i in n.input)]
    assert len(both) == 4
    before_q = [producer[producer[producer[n.input[0]].input[0]].input[0]].op_type for n in both]
    assert sorted(before_q) == ["Mul", "Mul", "Softmax", "Softmax"]  # scale on the Q side; Softmax -> Q -> DQ
    # ONNX Runtime runs the Q/DQ graph as the fake-quantized model computes it, up to float32 summation order
    # (1e-4 of RMS). Where that order moves a value across a rounding boundary, one int8 step flips and the sample
    # moves by about a step of the layers after it: allow 2 such samples of 32, each within 10% of the RMS.
    with torch.no_grad():
        want = qmodel(x).numpy()
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    error = np.abs(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0] - want).max(axis=1)
    rms = float(np.sqrt((want ** 2).mean()))
    assert (error > 1e-4 * rms).sum() <= 2 and error.max() <= 0.1 * rms, (error / rms)


# MatMuls ONNX Runtime runs on integer kernels (MatMulIntegerToFloat, or QLinearMatMul where a Q follows): per layer
# q, k, v (timm: one qkv), out, 2 MLP, 2 attention; the classifier head on [N, C] (and BERT's pooler) is a Gemm
INTEGER_MATMULS = {"timm_vit": 2 * (1 + 1 + 2 + 2), "hf_bert": 2 * (3 + 1 + 2 + 2)}


@pytest.mark.parametrize("name", INTEGER_MATMULS)
def test_onnxruntime_runs_every_matmul_on_integer_kernels(name: str, tmp_path) -> None:
    _, qmodel, x = _calibrated(name, "onnxruntime")
    export_onnx(qmodel, x[:1], tmp_path / "m.onnx", opset=13, target="onnxruntime")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")  # the default level (all), as users run it
    ort.InferenceSession(str(tmp_path / "m.onnx"), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node)
    assert ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] == INTEGER_MATMULS[name] and ops["MatMul"] == 0, ops


@pytest.mark.parametrize("name", ["timm_vit", "hf_bert"])
def test_a_checkpoint_rebuilds_the_attention_quantizers(name: str, tmp_path) -> None:
    _, qmodel, x = _calibrated(name)
    compress.save(qmodel, tmp_path / "q.pt")
    again = compress.load(tmp_path / "q.pt", trust=["helpers_sdpa"]).eval()  # untraced sites from the checkpoint
    assert quant.plan_of(again).sdpa == SITES[name]
    assert _sdpa_quantizers(again) == _sdpa_quantizers(qmodel)
    with torch.no_grad():
        assert torch.equal(again(x), qmodel(x))


def test_a_deep_copy_routes_through_its_own_quantizers() -> None:
    _, qmodel, x = _calibrated("hf_bert")
    twin = copy.deepcopy(qmodel)
    site = twin.get_submodule(SITES["hf_bert"][0])
    assert site.forward.site is site  # not the original's
    with torch.no_grad():
        assert torch.equal(twin(x), qmodel(x))
        site.sdpa_quant.probs_quantizer.amax.fill_(1e-3)  # the copy's quantizer is the one its forward uses
        assert not torch.equal(twin(x), qmodel(x))


@pytest.mark.parametrize("name", ["timm_vit", "hf_bert"])
def test_attention_float_keeps_the_attention_matmuls_float(name: str, tmp_path) -> None:
    _, qmodel, x = _calibrated(name, attention="float")
    assert _sdpa_quantizers(qmodel) == [] and quant.plan_of(qmodel).sdpa == SITES[name]  # listed, float
    info = export_onnx(qmodel, x[:1], tmp_path / "m.onnx", opset=13, target="tensorrt")
    assert info.rules.passed and info.rules.attention_matmuls == 0 and info.rules.float_ops == 4
    compress.save(qmodel, tmp_path / "q.pt")
    assert quant.plan_of(compress.load(tmp_path / "q.pt", trust=["helpers_sdpa"])).sdpa == SITES[name]


def test_attention_fused_and_no_example_input_leave_sdpa_alone() -> None:
    model, x = _model("hf_bert"), _inputs("hf_bert")
    fused = quant.prepare(model, "tensorrt", attention="fused", example_input=x[:2])
    assert quant.plan_of(fused).sdpa == [] and _sdpa_quantizers(fused) == []
    blind = quant.prepare(model, "tensorrt")  # an untraced model: the sites cannot be found without running it
    assert quant.plan_of(blind).sdpa == [] and _sdpa_quantizers(blind) == []
    assert "no example input" in quant.plan_of(blind).sdpa_skipped


def test_sites_are_found_with_tuple_and_dict_example_inputs() -> None:
    model, x = _model("hf_bert"), _inputs("hf_bert")[:2]
    assert find_sites(model, (x,)) == SITES["hf_bert"]
    assert find_sites(model.model, {"input_ids": x}) == [s.removeprefix("model.") for s in SITES["hf_bert"]]


def test_excluding_a_layers_attention_keeps_its_matmuls_float() -> None:
    model, x = _model("timm_vit"), _inputs("timm_vit")
    qmodel = quant.prepare(model, "tensorrt", exclude=["blocks.1.attn.*"], example_input=x[:2])
    assert quant.plan_of(qmodel).sdpa == ["blocks.0.attn"]
    assert len(_sdpa_quantizers(qmodel)) == 4


def test_a_quantizer_refuses_integer_tensors() -> None:
    q = TensorQuantizer(activation_spec(Target.tensorrt), name="embeddings.ids")
    q.calib_enabled = True
    with pytest.raises(DataError, match=r"embeddings.ids: got a torch.int64 tensor"):
        q(torch.arange(4))


BERT_PTQ = """\
    name: bert-ptq
    model: {factory: "helpers_sdpa:hf_bert", trust: [helpers_sdpa]}
    data:
      calibration: {source: python, factory: "helpers_sdpa:token_task", batch_size: 16}
      eval: {source: python, factory: "helpers_sdpa:token_task", batch_size: 16}
    metric: top1
    stages:
      - ptq: {calibrator: max}
"""


def test_the_ptq_stage_finds_bert_attention_on_token_ids_and_reports_it(write_recipe, cli, tmp_path) -> None:
    """The stage finds the sites on the pipeline's example input (int64 ids; calibration never quantizes them)."""
    out = tmp_path / "run"
    assert cli("run", write_recipe(BERT_PTQ), "--out", out, "--quiet").code == 0
    report = json.loads((out / "report.json").read_text())
    stage = report["stages"][0]
    assert stage["attention"] == {"modules": 2, "matmuls": "int8"}
    assert stage["kept_float"] == {"LayerNorm": 5, "Softmax": 2}  # 2 x 2 in the layers + the embeddings'
    assert stage["quantized_layers"] == 2 * 6 + 2  # q, k, v, out, 2 MLP per layer; pooler, classifier
    rebuilt = compress.load(out / stage["checkpoint"], trust=["helpers_sdpa"])
    assert quant.plan_of(rebuilt).sdpa == SITES["hf_bert"] and not quant.uncalibrated(rebuilt)
