"""What is not INT8 in an ONNX Runtime engine: every weighted op left in float, its reason, the INT8 MAC share."""

from __future__ import annotations

import re

import pytest
import torch
from helpers_recipes import read_report, stage_recipe
from torch import nn

import compress
from compress import ptq, quant
from compress.export.coverage import FloatReason, coverage, layer_of
from compress.export.onnx import export_onnx
from compress.export.onnxruntime import Optimization, build_engine
from compress.profile import count_macs, layer_macs


class Mixer(nn.Module):
    """Two convs, then one self-attention step over the 8x8 positions (q/k projections, Q.K^T and A.V
    as activation x activation MatMuls) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)
        self.fc = nn.Linear(64 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        t = x.flatten(2).transpose(1, 2)  # (batch, 64 positions, 16)
        attention = torch.softmax(self.q(t) @ self.k(t).transpose(1, 2), -1)
        return self.fc((attention @ t).flatten(1))


# MACs of one 8x8 sample, by hand: conv out positions x out channels x (in channels x kernel)
CONV1, CONV2 = 64 * 8 * 9, 64 * 16 * 8 * 9
PROJ, ATTN, FC = 64 * 16 * 16, 64 * 64 * 16, 1024 * 10


def _engine(tmp_path, target: str, exclude: list[str]):
    torch.manual_seed(0)
    qmodel = quant.prepare(Mixer().eval(), target, exclude=exclude)
    data = [(torch.randn(16, 1, 8, 8), torch.zeros(16)) for _ in range(4)]
    ptq.calibrate(qmodel, data, "max", progress=False)
    tmp_path.mkdir(exist_ok=True)
    source = tmp_path / f"{target}.onnx"
    export_onnx(qmodel, torch.zeros(1, 1, 8, 8), source, target=target)
    engine = build_engine(source, tmp_path / f"{target}.engine.onnx", level=Optimization.extended)
    return qmodel, source, engine.path


def test_every_float_weighted_op_is_listed_with_its_reason_and_mac_share(tmp_path):
    qmodel, source, engine = _engine(tmp_path, "onnxruntime", exclude=["conv1"])
    cov = coverage(source, engine, qmodel)
    found = {(f.layer, f.node): (f.reason, f.macs) for f in cov.not_int8}
    assert found == {
        ("conv1", "/conv1/Conv"): (FloatReason.excluded, CONV1),
        # conv2's output reaches its quantizer only after reshape/transpose: ORT fuses only DQ -> Conv -> Q
        ("conv2", "/conv2/Conv"): (FloatReason.not_fused, CONV2),
        ("", "/MatMul"): (FloatReason.attention_matmul, ATTN),
        ("", "/MatMul_1"): (FloatReason.attention_matmul, ATTN),
    }
    details = {f.layer or f.node: f.detail for f in cov.not_int8}
    assert details["conv1"] == "matches exclude pattern 'conv1'"
    assert details["conv2"].startswith("its output is not quantized")
    assert cov.weighted_macs == CONV1 + CONV2 + 2 * PROJ + 2 * ATTN + FC
    assert cov.int8_macs == 2 * PROJ + FC  # q, k and fc run in INT8 kernels, nothing else
    assert cov.to_dict()["int8_macs_fraction"] == round((2 * PROJ + FC) / cov.weighted_macs, 4)


def test_excluding_a_layer_the_engine_fuses_loses_exactly_its_mac_share(tmp_path):
    """fc's input quantizer stays (on the flatten) when fc is excluded: the INT8 share drops by fc's MACs alone."""
    qmodel, source, engine = _engine(tmp_path / "all", "onnxruntime", exclude=[])
    full = coverage(source, engine, qmodel)
    assert full.int8_macs == CONV1 + 2 * PROJ + FC
    qmodel, source, engine = _engine(tmp_path / "fc", "onnxruntime", exclude=["fc"])
    cov = coverage(source, engine, qmodel)
    reasons = {f.layer or f.node: f.reason for f in cov.not_int8}
    assert reasons["fc"] is FloatReason.excluded and reasons["conv2"] is FloatReason.not_fused
    assert full.weighted_macs == cov.weighted_macs and full.int8_macs - cov.int8_macs == FC
    macs = layer_macs(Mixer(), torch.zeros(1, 1, 8, 8))  # the profile's per-layer MACs agree with the ONNX shapes
    assert (macs["conv1"], macs["conv2"], macs["q"], macs["fc"]) == (CONV1, CONV2, PROJ, FC)


def test_tensorrt_placement_in_onnxruntime_and_a_disabled_engine_say_why_they_are_float(tmp_path):
    qmodel, source, engine = _engine(tmp_path, "tensorrt", exclude=[])
    cov = coverage(source, engine, qmodel)
    by_layer = {f.layer: f for f in cov.not_int8 if f.layer}
    assert {"conv1", "conv2"} <= set(by_layer)
    assert all(by_layer[n].reason is FloatReason.not_fused and "placed for TensorRT" in by_layer[n].detail
               for n in ("conv1", "conv2"))
    flat = coverage(source, source, qmodel, fuses=False)  # the file as written: no Q/DQ group fused
    assert flat.int8_macs == 0 and flat.weighted_macs == cov.weighted_macs
    assert {f.reason for f in flat.not_int8} == {FloatReason.not_fused, FloatReason.attention_matmul}


def test_layer_names_follow_torch_onnx_scopes():
    assert layer_of("/features/features.1/conv/conv.0/conv.0.0/Conv") == "features.1.conv.0.0"
    assert layer_of("/layer1/conv1/Conv") == "layer1.conv1"
    assert layer_of("/MatMul_1") == "" and layer_of("") == ""


@pytest.mark.slow
def test_report_lists_what_is_not_int8_and_the_levels_it_was_timed_at(write_recipe, cli, digits_cnn_checkpoint,
                                                                      tmp_path):
    stages = "  - ptq: {calibrator: max, limit: 256, exclude: [stem.0]}\n"
    out = tmp_path / "run"
    result = cli("run", stage_recipe(write_recipe, digits_cnn_checkpoint, stages), "--out", out)
    assert result.code == 0, result.err
    engine = read_report(out)["engine"]
    assert engine["optimization"] == {"file": "extended", "timed": "all", "checked": "all"}
    assert engine["int8_execution"] == "kernels" and engine["int8_weighted_fraction"] < 1.0
    (stem,) = engine["not_int8"]
    assert (stem["layer"], stem["reason"], stem["detail"]) == ("stem.0", "excluded", "matches exclude pattern 'stem.0'")
    model = compress.load(digits_cnn_checkpoint)
    example = torch.zeros(1, 1, 8, 8)
    assert stem["macs"] == layer_macs(model, example)["stem.0"] == 8 * 8 * 32 * 9
    assert engine["weighted_macs"] == count_macs(model, example)  # a CNN: every MAC is a Conv/Gemm MAC
    assert engine["int8_macs"] == engine["weighted_macs"] - stem["macs"]  # exactly the excluded layer's share
    assert re.search(r"engine: INT8 kernels run 99\.1% of the weighted-op MACs; 1 weighted op\(s\) in float: "
                     r"`stem\.0` \(excluded, 1% of MACs\)", result.err)
    assert "engine: engine.onnx saved at optimization extended; checked at all, timed at all" in result.err
    md = (out / "report.md").read_text()
    assert "| `stem.0` | `/stem.0/Conv` | Conv | excluded | 18,432 | matches exclude pattern 'stem.0' |" in md


@pytest.mark.slow
def test_a_tensorrt_graph_checked_in_onnxruntime_says_it_simulates_int8(write_recipe, cli, digits_cnn_checkpoint,
                                                                       tmp_path):
    stages = "  - ptq: {calibrator: max, limit: 256}\n"
    out = tmp_path / "run"
    result = cli("run", stage_recipe(write_recipe, digits_cnn_checkpoint, stages, target="tensorrt"), "--out", out)
    assert result.code == 0, result.err
    engine = read_report(out)["engine"]
    assert engine["int8_execution"] == "simulated"
    assert engine["int8_note"].startswith("the Q/DQ graph runs in ONNX Runtime, which simulates INT8 in float")
    assert re.search(r"engine: WARNING the Q/DQ graph runs in ONNX Runtime, which simulates INT8 in float: its "
                     r"accuracy is valid, its latency is not that of INT8 kernels \(nor TensorRT's\)", result.err)
    assert "simulates INT8 in float" in (out / "report.md").read_text()


def test_fx_traced_torchvision_layers_are_named_and_excluded_ones_ort_quantizes_are_flagged(tmp_path):
    """resnet18 is quantized through torch.fx, whose export names lose scopes (`layer2.0.conv1` exports as
    `/conv1_3/Conv`): layers are found from their weights' names instead."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    qmodel = quant.prepare(torchvision.models.resnet18(num_classes=10).eval(), "onnxruntime",
                           exclude=["layer2.0.conv1", "fc"])
    ptq.calibrate(qmodel, [torch.randn(4, 3, 32, 32)], "max", progress=False)
    source = tmp_path / "r18.onnx"
    export_onnx(qmodel, torch.zeros(1, 3, 32, 32), source, target="onnxruntime")
    engine = build_engine(source, tmp_path / "r18.engine.onnx", level=Optimization.all)
    cov = coverage(source, engine.path, qmodel)
    named = {f.layer: f.reason for f in cov.not_int8}
    in_float_or_flagged = set(named) | set(cov.int8_unplanned)
    assert {"layer2.0.conv1", "fc"} <= in_float_or_flagged  # every excluded layer is accounted for, by name
    assert all(layer for layer in named)  # no weighted op falls back to the model's own forward ('')
    for layer in set(named) & {"layer2.0.conv1", "fc"}:
        assert named[layer] is FloatReason.excluded
    # every weighted op is matched to its engine node (level all renames fused nodes `..._token_N`)
    assert cov.int8_macs + sum(f.macs for f in cov.not_int8) == cov.weighted_macs == count_macs(qmodel, torch.zeros(1, 3, 32, 32))
