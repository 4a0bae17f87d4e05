"""torchvision Swin: its window attention calls ``F.linear(x, self.qkv.weight)`` instead of calling ``qkv``, so fx
keeps ``qkv``/``proj`` only as holders of their weights. Those layers are left float with that reason (they used to
crash ``prepare`` with a KeyError); the rest quantizes, calibrates and exports at opset 13."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import torch
import torchvision

from compress import export, ptq, quant


def _swin() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=32, depths=[2], num_heads=[2], window_size=[4, 4], num_classes=10).eval()


def test_swin_window_attention_projections_stay_float_with_the_reason_and_the_rest_exports(tmp_path) -> None:
    model, x = _swin(), torch.randn(4, 3, 32, 32)
    qmodel = quant.prepare(model, "onnxruntime", example_input=x[:1])
    plan = quant.plan_of(qmodel)
    direct = {n for n, (why, _) in plan.skipped.items() if why is quant.insert.Skip.never_called}
    assert direct == {f"features.1.{i}.attn.{p}" for i in range(2) for p in ("qkv", "proj")}
    assert all("reads its weight directly" in plan.skipped[n][1] for n in direct)
    assert len(plan.layers) == 6  # patch embedding, 2 x 2 MLP layers, head
    ptq.calibrate(qmodel, [x], "max")
    path = tmp_path / "swin.onnx"
    export.onnx(qmodel, x[:1], path, opset=13, target="onnxruntime")
    graph = onnx.load(str(path)).graph
    int8_weights = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"
                    and n.input[0].endswith(".weight_quantized")}
    assert int8_weights == {f"{layer}.weight_quantized" for layer in plan.layers}  # no Q/DQ on the float projections
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.as_tensor(session.run(None, {session.get_inputs()[0].name: x[:1].numpy()})[0])
    with torch.no_grad():
        want = qmodel(x[:1])
    # the engine and the fake-quant model round the same tensors; logits ~1 differ by float order only
    torch.testing.assert_close(got, want, atol=0.05 * want.abs().max().item(), rtol=0)
