"""Quantization units (which quantizers switch together) and keep_float (recorded, reloaded, exported float)."""

from __future__ import annotations

import onnx
import pytest
import torch
from helpers_budget import SENSITIVE, sensitive_model
from helpers_quant import digits, top1

import compress
from compress import quant
from compress.errors import CheckpointError
from compress.export.coverage import locate
from compress.export.onnx import export_onnx
from compress.export.qdq import WEIGHTED_OPS, Graph


def test_units_group_each_layers_own_quantizers_and_cover_every_quantizer(mlp_checkpoint):
    model = compress.load(mlp_checkpoint)
    for target in quant.Target:
        qmodel = quant.prepare(model, target)
        found = quant.units(qmodel)
        names = [q for u in found for q in u.quantizers]
        assert sorted(names) == sorted(n for n, _ in quant.quantizers(qmodel))  # each quantizer in exactly one unit
        layers = {u.name: u for u in found if u.kind is quant.UnitKind.layer}
        assert set(layers) == {"1", "3"}
        assert "1.weight_quantizer" in layers["1"].quantizers


def test_onnxruntime_unit_takes_the_graph_quantizer_of_a_tensor_only_it_reads(digits_cnn_checkpoint):
    qmodel = quant.prepare(compress.load(digits_cnn_checkpoint), "onnxruntime")
    found = {u.name: u for u in quant.units(qmodel)}
    assert found["stem.0"].quantizers == ("stem.0.weight_quantizer", "act_quant.x_out")  # the model input
    assert found["layer1.conv2"].quantizers == ("layer1.conv2.weight_quantizer", "act_quant.layer1_relu_out")
    # the stem's output feeds layer1.conv1 and the residual add: shared, so a unit of its own
    assert found["layer1.conv1"].quantizers == ("layer1.conv1.weight_quantizer",)
    assert found["act_quant.stem_2_out"].kind is quant.UnitKind.graph


def test_tensorrt_groups_a_residual_adds_input_quantizers():
    from compress.zoo import vit_tiny

    qmodel = quant.prepare(vit_tiny(), "tensorrt", example_input=torch.randn(1, 3, 32, 32))
    found = {u.name: u for u in quant.units(qmodel)}
    assert found["act_quant.add"].quantizers == ("act_quant.add_in0", "act_quant.add_in1")
    attention = found["encoder.layers.encoder_layer_0.self_attention"]
    assert attention.kind is quant.UnitKind.attention and len(attention.quantizers) == 4


def test_quantizing_switches_and_restores():
    from compress.zoo import digits_mlp

    torch.manual_seed(0)
    qmodel = quant.prepare(digits_mlp(hidden=8), "tensorrt")
    compress.ptq.calibrate(qmodel, digits("train"), "max", limit=128)
    found = quant.units(qmodel)
    with quant.quantizing(qmodel, [], found):
        assert not any(q.quant_enabled for _, q in quant.quantizers(qmodel))
    assert all(q.quant_enabled for _, q in quant.quantizers(qmodel))
    with pytest.raises(RuntimeError), quant.quantizing(qmodel, found[:1], found):
        raise RuntimeError("restored on the way out too")
    assert all(q.quant_enabled for _, q in quant.quantizers(qmodel))


def _dq_fed(path, model) -> dict[str, tuple[bool, bool]]:
    """Per weighted node's layer: (input from a DequantizeLinear, weight from a DequantizeLinear)."""
    proto = onnx.load(str(path))
    graph = Graph(proto)
    out = {}
    for node in proto.graph.node:
        if node.op_type in WEIGHTED_OPS:
            layer, _ = locate(node, graph, model)
            fed = [graph.producer.get(i) is not None and graph.producer[i].op_type == "DequantizeLinear"
                   for i in node.input[:2]]
            out[layer] = (fed[0], fed[1])
    return out


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_keep_float_survives_save_load_and_exports_without_qdq(digits_cnn_checkpoint, tmp_path, target):
    qmodel = sensitive_model(digits_cnn_checkpoint, target)
    test = digits("test", 360)
    broken = top1(qmodel, test)
    kept = quant.keep_float(qmodel, [SENSITIVE])
    assert [u.name for u in kept] == [SENSITIVE] and quant.float_units(qmodel) == [SENSITIVE]
    fixed = top1(qmodel, test)
    assert fixed - broken > 0.01  # the broken layer in float wins back many samples (>= 4 of 360)
    assert SENSITIVE not in [u.name for u in quant.units(qmodel)]

    compress.save(qmodel, tmp_path / "model.pt")
    loaded = compress.load(tmp_path / "model.pt")
    assert quant.float_units(loaded) == [SENSITIVE]
    disabled = sorted(n for n, q in quant.quantizers(loaded) if not q.quant_enabled)
    assert disabled == sorted(kept[0].quantizers)
    assert top1(loaded, test) == fixed  # the same model: same predictions on every sample

    fed = _dq_fed(export_onnx(loaded, next(iter(test))[0][:1], tmp_path / "model.onnx").path, loaded)
    assert fed[SENSITIVE] == (False, False)  # no Q/DQ on the float layer's input nor weight
    assert fed["layer1.conv1"][1] and fed["fc"] == (True, True)  # the others stay INT8


def test_keep_float_refuses_unknown_units_and_a_bad_record(digits_cnn_checkpoint, tmp_path):
    qmodel = sensitive_model(digits_cnn_checkpoint)
    with pytest.raises(ValueError, match="'nope' is not a quantized unit"):
        quant.keep_float(qmodel, ["nope"])
    quant.keep_float(qmodel, ["fc"])
    with pytest.raises(ValueError, match="'fc' is not a quantized unit"):  # already float
        quant.keep_float(qmodel, ["fc"])
    path = tmp_path / "model.pt"
    compress.save(qmodel, path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["structure"][-1]["payload"]["quantizers"] = ["fc.nothing"]
    del ckpt["weights_sha256"]
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"quant_float.*'fc.nothing' is not a quantizer"):
        compress.load(path)
