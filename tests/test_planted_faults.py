"""Planted faults in deployed engines: the default ``compress check`` catches what it promises, and
``--layers`` names the faulted layer first, in FP32 and INT8 engines (README, "compress check").

Engines are ONNX Runtime engine files (``build_engine``: saved at level ``extended``, so FP32 convs are
``FusedConv`` and Q/DQ groups are ``QLinearConv``/``QGemm`` or ``DequantizeLinear -> FusedConv``) of the
trained digits CNN. Faults are planted in what the engine computes with (helpers_faults).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers_faults import plant

import compress
from compress.cli import main
from compress.data import build_loader
from compress.export.drift import DRIFT_FACTOR, DRIFT_FLOOR, FLOAT_TOLERANCE
from compress.export.localize import localize
from compress.export.onnxruntime import build_engine
from compress.export.unfuse import unfuse
from compress.recipe import DigitsData

KINDS = ("fp32", "int8", "int8-tensorrt")  # int8: QLinearConv/QGemm; int8-tensorrt: DQ -> FusedConv mixed with QLinearConv
FAULTS = [("layer2.conv1", "x1.02"), ("layer2.conv1", "x1.1"), ("layer2.conv1", "x1.5"),
          ("layer2.conv1", "zeroed channel"), ("layer2.conv1", "flipped bias"), ("fc", "x1.1")]
LAYERS = ("stem.0", "layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2", "layer2.shortcut.0", "fc")


def _check(report: Path, *args: object) -> tuple[int, dict[str, Any]]:
    code = main(["check", *map(str, args), "--report", str(report), "--quiet"])
    return code, json.loads(report.read_text())


@pytest.fixture(scope="module")
def engines(digits_cnn_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """kind -> engine file, each with ``ENGINE.npz`` saved beside it (``--save-reference``, REF the checkpoint)
    and ``ENGINE.json``, its check against the checkpoint; "reference" -> the checkpoint's FP32 export."""
    folder = tmp_path_factory.mktemp("engines")
    example = torch.zeros(1, 1, 8, 8)
    calib = build_loader(DigitsData(source="digits", split="train", batch_size=64, limit=256), "calib", train=False)
    files = {"fp32": folder / "fp32.onnx"}
    compress.export.onnx(compress.load(digits_cnn_checkpoint), example, files["fp32"])
    for kind, target in (("int8", "onnxruntime"), ("int8-tensorrt", "tensorrt")):
        qmodel = compress.quant.prepare(compress.load(digits_cnn_checkpoint), target=target)
        compress.ptq.calibrate(qmodel, calib, method="max")
        files[kind] = folder / f"{kind}.onnx"
        compress.export.onnx(qmodel, example, files[kind], target=target)
    engines = {}
    for kind, path in files.items():
        engines[kind] = build_engine(path, folder / f"{kind}.engine.onnx").path
        code, doc = _check(engines[kind].with_suffix(".json"), engines[kind], "--reference", digits_cnn_checkpoint,
                           "--data", "digits:test", "--save-reference", engines[kind].with_suffix(".npz"))
        assert code == 0, doc["failures"]
    return {**engines, "reference": files["fp32"]}


def _clean(engine: Path) -> dict[str, Any]:
    return json.loads(engine.with_suffix(".json").read_text())


def test_engines_are_fused_and_int8(engines) -> None:
    ops = {kind: {n.op_type for n in onnx.load(str(engines[kind])).graph.node} for kind in KINDS}
    assert "FusedConv" in ops["fp32"] and not ops["fp32"] & {"QLinearConv", "QuantizeLinear"}
    assert {"QLinearConv", "QGemm"} <= ops["int8"] and "Conv" not in ops["int8"]
    assert {"QLinearConv", "FusedConv", "DequantizeLinear"} <= ops["int8-tensorrt"]


@pytest.mark.parametrize("kind", KINDS)
def test_an_unchanged_engine_passes_its_saved_reference_and_its_model(engines, digits_cnn_checkpoint, kind, tmp_path):
    engine = engines[kind]
    code, doc = _check(tmp_path / "r.json", engine, "--reference", engine.with_suffix(".npz"))
    drift = doc["drift"]
    # ONNX Runtime on the CPU at the same settings repeats itself exactly; the bound is for rebuilds elsewhere
    assert code == 0 and drift["rel_error"] == 0.0 and drift["same_file"], doc["failures"]
    variants = drift["calibration"]["variants"]
    assert drift["max_rel_error"] == pytest.approx(max(DRIFT_FACTOR * max(variants.values()), DRIFT_FLOOR))
    if kind == "int8":  # integer kernels vs the float view: a requantization may land one step apart
        assert 0 < variants["un-fused view"] < 0.02 and drift["max_rel_error"] < 0.08
    code, doc = _check(tmp_path / "r.json", engine, "--reference", digits_cnn_checkpoint, "--data", "digits:test")
    assert code == 0, doc["failures"]
    # FP32 pair: ORT vs PyTorch differ by float rounding (~2e-6 of the RMS here), bounded by default
    assert doc["thresholds"]["max_rel_error"] == (FLOAT_TOLERANCE if kind == "fp32" else None)


@pytest.mark.parametrize("layer, fault", FAULTS, ids=[f"{layer}-{fault}" for layer, fault in FAULTS])
@pytest.mark.parametrize("kind", KINDS)
def test_a_planted_fault_is_caught_by_default_and_named_first(engines, digits_cnn_checkpoint, kind, layer, fault,
                                                              tmp_path) -> None:
    engine = engines[kind]
    bad = plant(engine, tmp_path / "bad.onnx", layer, fault)
    code, doc = _check(tmp_path / "saved.json", bad, "--reference", engine.with_suffix(".npz"))
    assert code == 1 and any(f.startswith("drift: ") for f in doc["failures"]), doc["failures"]
    assert doc["drift"]["rel_error"] > 2 * doc["drift"]["max_rel_error"]  # not a near miss
    assert not doc["drift"]["same_file"]
    code, doc = _check(tmp_path / "live.json", bad, "--reference", digits_cnn_checkpoint, "--data", "digits:test",
                       "--layers", "3")
    first, second = doc["layers"][:2]
    assert first["layer"] == layer and first["jump"] > 2 * second["jump"], doc["layers"][:3]
    assert doc["layers_view"]["model"]["unfused"] and doc["unmatched_layers"] == []
    if kind == "fp32":  # against a live FP32 model, the float tolerance catches every fault
        assert code == 1 and doc["rel_error"] > 100 * FLOAT_TOLERANCE
    else:  # an INT8 engine against the FP32 model: only the accuracy drop is promised; the error is reported
        assert code == (1 if doc["drop"] > 0.5 else 0)
        assert doc["rel_error"] > 1.5 * _clean(engine)["rel_error"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_layer_is_localised_in_every_engine(engines, kind, tmp_path) -> None:
    x = torch.cat([b[0] for b in build_loader(DigitsData(source="digits", split="test", batch_size=360), "t")])
    named = {}
    for layer in LAYERS:  # the FP32 export as REF: what --layers makes of the checkpoint, exported once
        found = localize(plant(engines[kind], tmp_path / "bad.onnx", layer, "x1.1"), engines["reference"], [x])
        named[layer] = found.layers[0].layer
    assert named == {layer: layer for layer in LAYERS}


def _tapped_session(model: onnx.ModelProto, tensors: list[str]) -> Callable[[np.ndarray], list[np.ndarray]]:
    outputs = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors if t not in outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(tensors, {session.get_inputs()[0].name: x})


def test_the_unfused_view_computes_what_the_int8_engine_computes(engines) -> None:
    engine = onnx.load(str(engines["int8"]))
    requantized = [n.output[0] for n in engine.graph.node if n.op_type == "QLinearConv"]
    view, taps = unfuse(engine)
    assert set(taps) == {n.name for n in engine.graph.node if n.op_type in ("QLinearConv", "QGemm")}
    assert {n.op_type for n in view.graph.node}.isdisjoint({"QLinearConv", "QGemm"})
    x = torch.cat([b[0] for b in build_loader(DigitsData(source="digits", split="test", batch_size=360), "t")]).numpy()
    ours = _tapped_session(engine, requantized)(x)
    theirs = _tapped_session(view, requantized)(x)
    for name, a, b in zip(requantized, ours, theirs, strict=True):
        steps = np.abs(a.astype(np.int32) - b.astype(np.int32))
        # integer accumulation vs float: where a value sits on a rounding tie it lands one step apart, rarely
        assert steps.max() <= 1 and steps.mean() < 0.01, (name, steps.max(), steps.mean())


def test_max_rel_error_is_checked_and_inf_turns_it_off(engines, digits_cnn_checkpoint, tmp_path) -> None:
    bad = plant(engines["fp32"], tmp_path / "bad.onnx", "layer2.conv1", "x1.02")
    live = ("--reference", digits_cnn_checkpoint, "--data", "digits:test")
    for flag in ("nan", "-1"):
        assert main(["check", str(bad), *map(str, live), "--max-rel-error", flag, "--quiet"]) == 2
    code, doc = _check(tmp_path / "r.json", bad, *live, "--max-rel-error", "inf")
    assert code == 0 and doc["thresholds"]["max_rel_error"] is None and doc["rel_error"] > 0.01  # reported, not held
    code, doc = _check(tmp_path / "r.json", bad, "--reference", engines["fp32"].with_suffix(".npz"), "--max-rel-error", "inf")
    assert code == 0 and doc["drift"]["max_rel_error"] is None
    code, doc = _check(tmp_path / "r.json", bad, "--reference", engines["fp32"].with_suffix(".npz"), "--max-rel-error", "0.1")
    assert code == 0 and doc["drift"]["max_rel_error"] == 0.1  # x1.02 moves the outputs by 0.084 of their RMS


def test_the_unfused_view_of_clip_and_gemm_fusions_matches_the_engine(tmp_path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU6(), torch.nn.Conv2d(4, 4, 3),
                                torch.nn.LeakyReLU(0.1), torch.nn.Flatten(), torch.nn.Linear(144, 10),
                                torch.nn.ReLU()).eval()
    compress.export.onnx(model, torch.zeros(1, 1, 8, 8), tmp_path / "m.onnx")
    engine = onnx.load(str(build_engine(tmp_path / "m.onnx", tmp_path / "e.onnx").path))
    fused = sorted(n.op_type for n in engine.graph.node if n.op_type.startswith("Fused"))
    assert fused == ["FusedConv", "FusedConv", "FusedGemm"]
    view, taps = unfuse(engine)
    x = torch.randn(16, 1, 8, 8).numpy()
    out = engine.graph.output[0].name
    a = _tapped_session(engine, [out])(x)[0]
    b = _tapped_session(view, [out])(x)[0]
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()  # the same float ops, unfused: rounding only
    assert len(taps) == 3


def test_the_python_api_applies_the_float_tolerance_to_fp32_pairs(engines, digits_cnn_checkpoint, tmp_path) -> None:
    model = compress.load(digits_cnn_checkpoint)
    test = build_loader(DigitsData(source="digits", split="test", batch_size=128), "digits:test")
    bad = plant(engines["fp32"], tmp_path / "bad.onnx", "layer2.conv1", "x1.02")
    result = compress.check(bad, reference=model, data=test)
    assert not result.passed and result.drop == 0.0 and result.thresholds["max_rel_error"] == FLOAT_TOLERANCE
    assert compress.check(bad, reference=model, data=test, fp32_tolerance=False).passed  # accuracy alone: unmoved
    assert compress.check(engines["fp32"], reference=model, data=test).passed
    int8 = compress.check(engines["int8"], reference=model, data=test)  # not an FP32 pair: no float tolerance
    assert int8.passed and int8.thresholds["max_rel_error"] is None
