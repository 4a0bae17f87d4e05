"""``compress check`` for deployed engines: per-layer localisation, saved references, damaged files."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import onnx
import pytest
import torch
from onnx import numpy_helper

import compress
from compress.export.reference import load_reference


@pytest.fixture
def exported(digits_cnn_checkpoint: Path, tmp_path: Path) -> Path:
    model = compress.load(digits_cnn_checkpoint)
    path = tmp_path / "model.onnx"
    compress.export.onnx(model, torch.zeros(1, 1, 8, 8), path)
    return path


def _perturb(src: Path, dst: Path, layer: str, factor: float) -> None:
    proto = onnx.load(str(src))
    node = next(n for n in proto.graph.node if n.name.split("/")[1:-1] and n.name.endswith("/Conv")
                and ".".join(n.name.split("/")[1:-1]) == layer)
    init = next(t for t in proto.graph.initializer if t.name == node.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor, init.name))
    onnx.save(proto, str(dst))


def test_a_planted_one_layer_fault_fails_the_check_and_is_named_first(exported, digits_cnn_checkpoint, cli, tmp_path):
    _perturb(exported, tmp_path / "bad.onnx", "layer2.conv1", 1.4)
    report = tmp_path / "check.json"
    for reference in (exported, digits_cnn_checkpoint):  # an FP32 ONNX, or the PyTorch checkpoint (exported inside)
        result = cli("check", tmp_path / "bad.onnx", "--reference", reference, "--data", "digits:test",
                     "--layers", "3", "--report", report)
        assert result.code == 1, result.out
        assert result.out.splitlines()[1].startswith("  layer layer2.conv1: error ")
        doc = json.loads(report.read_text())
        first, second = doc["layers"][:2]
        assert first["layer"] == "layer2.conv1" and first["jump"] > 0.2
        assert second["jump"] < 0.5 * first["jump"]  # downstream layers inherit the error, they do not jump
        upstream = {e["layer"]: e["rel_error"] for e in doc["layers"]}
        assert upstream["stem.0"] < 1e-5 and upstream["layer1.conv2"] < 1e-5
        assert doc["unmatched_layers"] == []
        assert "## Layers where the error jumps most" in report.with_suffix(".md").read_text()


def test_an_export_checks_clean_against_its_checkpoint(exported, digits_cnn_checkpoint, cli, tmp_path):
    result = cli("check", exported, "--reference", digits_cnn_checkpoint, "--data", "digits:test", "--layers",
                 "--report", tmp_path / "c.json")
    assert result.code == 0 and result.out.strip().endswith("passed")
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["agreement"] == 1.0 and max(e["rel_error"] for e in doc["layers"]) < 1e-5


def test_a_saved_reference_checks_an_engine_after_the_model_is_gone(exported, digits_cnn_checkpoint, cli, tmp_path):
    ref = tmp_path / "ref.npz"
    assert cli("check", exported, "--reference", digits_cnn_checkpoint, "--data", "digits:test",
               "--save-reference", ref, "--report", tmp_path / "a.json").code == 0
    saved = load_reference(ref)
    assert saved.inputs.shape == (360, 1, 8, 8) and saved.outputs.shape == (360, 10) and len(saved.labels) == 360
    assert saved.meta["reference"] == str(digits_cnn_checkpoint) and "torch" in saved.meta["versions"]
    result = cli("check", exported, "--reference", ref, "--report", tmp_path / "b.json")
    assert result.code == 0
    assert json.loads((tmp_path / "b.json").read_text())["max_abs"] < 1e-4
    _perturb(exported, tmp_path / "drifted.onnx", "layer1.conv1", 0.5)
    assert cli("check", tmp_path / "drifted.onnx", "--reference", ref, "--min-agreement", "0.999",
               "--report", tmp_path / "c.json").code == 1


def test_damaged_files_and_bad_arguments_exit_2_in_one_line(exported, digits_cnn_checkpoint, cli, tmp_path):
    (tmp_path / "trunc.onnx").write_bytes(exported.read_bytes()[:300])
    ref = tmp_path / "ref.npz"
    assert cli("check", exported, "--reference", exported, "--data", "digits:test", "--save-reference", ref,
               "--report", tmp_path / "x.json").code == 0
    (tmp_path / "broken.npz").write_bytes(ref.read_bytes()[:200])
    data = ("--data", "digits:test")
    cases = [
        (("check", tmp_path / "trunc.onnx", "--reference", exported, *data), r"trunc.onnx: ONNX Runtime cannot load it"),
        (("check", tmp_path / "trunc.onnx", "--reference", exported, *data, "--layers"), r"trunc.onnx"),
        (("check", exported, "--reference", ref, *data), r"--data: .* carries its own inputs; drop --data"),
        (("check", exported, "--reference", exported), r"--data or --recipe: required unless --reference is a saved"),
        (("check", exported, "--reference", exported, *data, "--recipe", tmp_path / "r.yaml"),
         r"argument --recipe: not allowed with argument --data"),
        (("check", exported, "--reference", ref, "--recipe", tmp_path / "none.yaml"), r"none.yaml: recipe file not found"),
        (("check", digits_cnn_checkpoint, "--reference", exported, *data, "--layers"), r"--layers: needs MODEL as an .onnx"),
        (("check", exported, "--reference", ref, "--layers"), r"--save-reference/--layers need a reference model"),
        (("check", exported, "--reference", tmp_path / "broken.npz"), r"broken.npz: is a damaged reference file"),
        (("check", exported, "--reference", tmp_path / "none.npz"), r"none.npz: reference file: no such file"),
        (("check", exported, "--reference", tmp_path / "fifo.npz"), r"fifo.npz: reference file: is not a regular file"),
    ]
    os.mkfifo(tmp_path / "fifo.npz")  # opening it would wait for a writer forever
    for args, expected in cases:
        result = cli(*args, "--report", tmp_path / "r.json")
        assert result.code == 2, (args, result.out)
        assert re.search(expected, result.error_line()), result.error_line()


def test_recipe_gives_the_data_and_the_metric(exported, digits_cnn_checkpoint, write_recipe, cli, tmp_path):
    from helpers_recipes import stage_recipe

    recipe = stage_recipe(write_recipe, digits_cnn_checkpoint, "  - ptq: {calibrator: max}\n", target=None)
    recipe.write_text(recipe.read_text().replace("stages:", "metric: agreement\nstages:"))
    result = cli("check", exported, "--reference", digits_cnn_checkpoint, "--recipe", recipe,
                 "--report", tmp_path / "r.json")
    assert result.code == 0, result.err
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["samples"] == 360 and doc["metric"] == "agreement"  # data.eval is digits:test
    assert doc["data"] == f"{recipe} (data.eval)"
    assert doc["model_metric"] > 0.99 and doc["reference_metric"] == 1.0


def _outputs(pred: list[int], labels: list[int]) -> compress.metrics.Outputs:
    return compress.metrics.Outputs(torch.nn.functional.one_hot(torch.tensor(pred), 4).float(), torch.tensor(labels))


def test_drop_in_samples_counts_lost_minus_gained_and_says_so() -> None:
    from compress.export.check import compare

    labels = [0, 1, 2, 3, 0, 1, 2, 3]
    reference = _outputs([0, 1, 2, 3, 0, 1, 2, 0], labels)  # 7 of 8 right
    model = _outputs([1, 2, 2, 3, 0, 1, 2, 3], labels)  # loses samples 0 and 1, gains sample 7: 6 of 8 right
    result = compare(model, reference, max_drop_samples=0)
    assert result.drop_samples == 1 and result.changed == 3 and result.drop == pytest.approx(12.5)
    assert not result.passed and result.thresholds["max_drop"] is None
    assert result.failures == ["top1 drop 1 of 8 samples (2 lost, 1 gained) > max_drop_samples 0"]
    assert compare(model, reference, max_drop_samples=1).passed
    points = compare(model, reference, max_drop=10.0)  # 12.5 pt: the message names the samples too
    assert points.failures == ["top1 drop 12.500 pt (1 of 8 samples (2 lost, 1 gained)) > max_drop 10.0 pt"]
    assert compare(model, reference, metric="agreement", max_drop_samples=2).failures[0].startswith(
        "agreement drop 3 of 8 samples changed their arg-max > max_drop_samples 2")


@pytest.mark.parametrize("flags, message", [
    (["--max-drop", "nan"], "--max-drop: nan is outside [0, inf]"),
    (["--min-agreement", "2"], "--min-agreement: 2.0 is outside [0, 1]"),
    (["--min-cosine", "nan"], "--min-cosine: nan is outside [-1, 1]"),
    (["--max-drop-samples", "-1"], "--max-drop-samples: must be >= 0, not -1"),
    (["--max-drop-samples", "2", "--metric", "cosine"], "max_drop_samples: counts samples, so it needs metric"),
])
def test_thresholds_no_result_can_meet_are_refused(exported, cli, tmp_path, flags, message) -> None:
    result = cli("check", exported, "--reference", exported, "--data", "digits:test", "--report",
                 tmp_path / "c.json", *flags)
    assert result.code == 2 and result.err.count("\n") == 1 and message in result.err, result.err
    assert not (tmp_path / "c.json").exists()


def test_check_in_samples_from_the_command_line(exported, digits_cnn_checkpoint, cli, tmp_path) -> None:
    _perturb(exported, tmp_path / "bad.onnx", "layer2.conv1", 1.4)
    result = cli("check", tmp_path / "bad.onnx", "--reference", exported, "--data", "digits:test",
                 "--max-drop-samples", "0", "--report", tmp_path / "c.json")
    doc = json.loads((tmp_path / "c.json").read_text())
    assert result.code == 1 and doc["drop_samples"] > 0 and doc["thresholds"]["max_drop"] is None
    assert f"({doc['drop_samples']} samples)" in result.out.splitlines()[0]
    assert "> max_drop_samples 0" in result.out


def test_outputs_with_nan_or_inf_fail_whatever_the_metric() -> None:
    from compress.export.check import compare

    labels = [0, 1, 2, 3]
    reference = _outputs([0, 1, 2, 3], labels)
    broken = _outputs([0, 1, 2, 3], labels)
    broken.logits[1, 2] = float("nan")
    broken.logits[3, 0] = float("inf")
    for metric in ("top1", "agreement", "cosine"):
        result = compare(broken, reference, metric=metric, max_drop=None)
        assert not result.passed and result.failures[0] == "model outputs hold 2 NaN/Inf value(s)", metric
    assert compare(reference, broken, metric="cosine", max_drop=None).failures == ["reference outputs hold 2 NaN/Inf value(s)"]


def test_hand_made_reference_files_exit_2_in_one_line(exported, cli, tmp_path):
    """A reference file is a file from anywhere: its meta JSON of the wrong type, a version that is not an
    int, a 0-d array or an overflowing drift bound are refused in one line (each was a traceback)."""
    import numpy as np

    ref = tmp_path / "ref.npz"
    assert cli("check", exported, "--reference", exported, "--data", "digits:test", "--save-reference", ref,
               "--report", tmp_path / "x.json").code == 0
    arrays = dict(np.load(ref, allow_pickle=False))
    meta = json.loads(str(arrays["compress_reference"]))
    cases = {
        "list": ({"compress_reference": np.array("[1, 2]")}, r"compress_reference entry is a JSON list"),
        "version": ({"compress_reference": np.array(json.dumps({**meta, "version": "2"}))}, r"v'2' is not one"),
        "nan": ({"compress_reference": np.array(json.dumps({**meta, "version": float("nan")}))}, r"vnan is not one"),
        "0d": ({"inputs": np.array(1.0, dtype=np.float32)}, r"holds a 0-d array"),
        "bigint": ({"compress_reference": np.array(json.dumps({**meta, "drift": {**meta["drift"],
                                                                                "tolerance": 10**400}}))},
                   r"drift bound do not pair"),
    }
    for name, (change, expected) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **{**arrays, **change})
        result = cli("check", exported, "--reference", path, "--report", tmp_path / "r.json")
        assert result.code == 2, (name, result.out, result.err)
        assert re.search(expected, result.error_line()), result.error_line()


def test_an_output_path_naming_an_input_is_refused_and_the_input_kept(exported, digits_cnn_checkpoint, cli, tmp_path):
    """``--save-reference ENGINE`` replaced the engine with an .npz (exit 0), ``--report CKPT`` the checkpoint with
    JSON: an output that is MODEL, REF, the recipe or another output is refused before anything is written."""
    link = tmp_path / "link.onnx"
    link.symlink_to(exported)
    before = {p: p.read_bytes() for p in (exported, digits_cnn_checkpoint)}
    data = ("--data", "digits:test")
    cases = [
        ("check", exported, "--reference", digits_cnn_checkpoint, *data, "--save-reference", exported),
        ("check", exported, "--reference", digits_cnn_checkpoint, *data, "--report", digits_cnn_checkpoint),
        ("check", exported, "--reference", digits_cnn_checkpoint, *data, "--save-reference", link),
        ("check", exported, "--reference", digits_cnn_checkpoint, *data, "--report", tmp_path / "r.json",
         "--save-reference", tmp_path / "r.md"),
        ("bench", exported, "--input-shape", "1,1,8,8", "--report", exported),
    ]
    for args in cases:
        message = cli(*args, "--quiet").error_line()
        assert "which this command reads or writes; writing it would replace that file" in message, (args, message)
    assert {p: p.read_bytes() for p in before} == before
