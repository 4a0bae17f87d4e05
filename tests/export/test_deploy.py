"""Deployment helpers: ``compress bench``, the Triton model repository, provenance in report.json."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from helpers_recipes import read_report, stage_recipe


def _export(write_recipe, checkpoint: Path, out: Path, triton: str = "") -> dict:
    stages = ("  - export:\n      onnx: {target: onnxruntime}\n      engine: {batch_sizes: [1], bench_iters: 2}\n"
              + (f"      triton: {triton}\n" if triton else ""))
    recipe = stage_recipe(write_recipe, checkpoint, stages, target=None)
    from compress.cli import main

    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 0
    return read_report(out)


def test_bench_times_every_batch_size_for_onnxruntime_and_eager(write_recipe, cli, digits_cnn_checkpoint, tmp_path):
    _export(write_recipe, digits_cnn_checkpoint, tmp_path / "run")
    onnx_file, checkpoint = tmp_path / "run" / "model.onnx", tmp_path / "run" / "model.pt"
    result = cli("bench", onnx_file, checkpoint, "--data", "digits:test", "--batch-sizes", "1", "8", "32",
                 "--threads", "1", "--iters", "5", "--report", tmp_path / "bench.json")
    assert result.code == 0, result.err
    *table, footer = result.out.splitlines()
    assert footer == ("(models timed round-robin; onnxruntime optimization all, thread spinning off; 5 runs per batch "
                      "size; p99 over fewer than 100 runs is about the slowest run)")
    # each model's whole path on its own line, then a row per batch size ending in its count of timed runs
    assert table[1] == f"{onnx_file} (onnxruntime)" and table[5] == f"{checkpoint} (torch)"
    rows = [line.split() for line in table[2:5] + table[6:9]]
    assert [(r[0], r[5]) for r in rows] == [(bs, "5") for bs in ("1", "8", "32")] * 2
    report = json.loads((tmp_path / "bench.json").read_text())
    for entry in report["models"]:
        timings = entry["latency"]
        assert set(timings) == {"1", "8", "32"}
        for bs, t in timings.items():
            assert 0 < t["p50_ms"] <= t["p90_ms"] <= t["p99_ms"]
            assert abs(t["throughput"] / (int(bs) / (t["p50_ms"] / 1000)) - 1) < 0.01  # p50_ms is rounded
        assert str(entry["best_batch_size"]) == max(timings, key=lambda b: timings[b]["throughput"])
    assert sum("<- best" in line for line in result.out.splitlines()) == 2


def test_bench_bad_input_is_one_line_exit_2(cli, tmp_path, digits_cnn_checkpoint):
    (tmp_path / "engine.plan").write_bytes(b"x")
    cases = [
        (("bench", tmp_path / "none.onnx", "--input-shape", "1,8,8"), r"none.onnx: no such file"),
        (("bench", "/dev/zero", "--input-shape", "1,8,8"), r"/dev/zero: is not a regular file"),
        (("bench", tmp_path / "engine.plan", "--input-shape", "1,8,8"), r"engine.plan: TensorRT cannot (run here|load it)"),
        (("bench", digits_cnn_checkpoint, "--input-shape", "3,8,8"), r"fails on an input of shape \[3, 8, 8\]"),
        (("bench", digits_cnn_checkpoint, "--input-shape", "1,x"), r"'1,x' is not a list of integers"),
        (("bench", digits_cnn_checkpoint, "--input-shape", "1,8,8", "--batch-sizes", "0"), r"must be positive"),
        (("bench", digits_cnn_checkpoint), r"give --data or --input-shape: no .onnx file among the models"),
    ]
    for args, expected in cases:
        result = cli(*args)
        assert result.code == 2 and re.search(expected, result.error_line()), result.err


def test_triton_repository_serves_the_exported_onnx(write_recipe, digits_cnn_checkpoint, tmp_path):
    report = _export(write_recipe, digits_cnn_checkpoint, tmp_path / "run", "{name: digits-cnn, max_batch_size: 16}")
    run = tmp_path / "run"
    assert report["export"]["triton"]["files"] == ["triton/digits-cnn/1/model.onnx", "triton/digits-cnn/config.pbtxt"]
    served = run / "triton" / "digits-cnn" / "1" / "model.onnx"
    assert served.read_bytes() == (run / "model.onnx").read_bytes()
    config = (run / "triton" / "digits-cnn" / "config.pbtxt").read_text()
    assert 'name: "digits-cnn"' in config and 'platform: "onnxruntime_onnx"' in config
    assert "max_batch_size: 16" in config and "dynamic_batching {" in config
    session = ort.InferenceSession(str(served), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert re.search(rf'input \[\n  {{\n    name: "{inp.name}"\n    data_type: TYPE_FP32\n    dims: \[ 1, 8, 8 \]', config)
    assert re.search(rf'output \[\n  {{\n    name: "{out.name}"\n    data_type: TYPE_FP32\n    dims: \[ 10 \]', config)
    batch = session.run(None, {inp.name: np.zeros((16, 1, 8, 8), np.float32)})[0]
    assert batch.shape == (16, 10)  # the batch dimension Triton fills is dynamic in the file


def test_triton_batching_needs_a_dynamic_batch_dimension(write_recipe, cli, digits_cnn_checkpoint):
    stages = ("  - export:\n      onnx: {dynamic_batch: false}\n      engine: {batch_sizes: [1]}\n"
              "      triton: {name: m, max_batch_size: 8}\n")
    result = cli("validate", stage_recipe(write_recipe, digits_cnn_checkpoint, stages, target=None))
    assert result.code == 2
    assert re.search(r"stages.0.export.triton.max_batch_size: Triton batches along a dynamic batch dimension",
                     result.error_line())
    bad_name = stages.replace("name: m", "name: 'a/b'")
    result = cli("validate", stage_recipe(write_recipe, digits_cnn_checkpoint, bad_name, target=None))
    assert result.code == 2 and "stages.0.export.triton.name" in result.error_line()


def test_report_records_versions_and_sha256_of_inputs_and_outputs(write_recipe, digits_cnn_checkpoint, tmp_path):
    report = _export(write_recipe, digits_cnn_checkpoint, tmp_path / "run")
    prov = report["provenance"]
    assert prov["versions"]["onnxruntime"] == ort.__version__ and "tensorrt" in prov["versions"]
    files = prov["files"]
    assert set(files) == {"recipe", "resolved_recipe", "input_checkpoint", "model", "onnx", "engine"}
    assert files["input_checkpoint"]["path"] == str(digits_cnn_checkpoint)
    for entry in files.values():
        assert hashlib.sha256(Path(entry["path"]).read_bytes()).hexdigest() == entry["sha256"]


def test_bench_times_models_round_robin_in_a_rotating_order():
    from compress.export.bench import latency_interleaved

    calls: list[tuple[str, int]] = []
    runs = [lambda x, n=n: calls.append((n, len(x))) for n in "abc"]
    timings = latency_interleaved(runs, torch.zeros(1, 4), (2,), warmup=1, iters=3)
    timed = calls[3:]  # after one warm-up call each
    assert [n for n, _ in timed] == list("abc" "bca" "cab") and {bs for _, bs in calls} == {2}
    assert [set(t) for t in timings] == [{"2"}] * 3


def test_bench_and_check_run_onnx_at_the_optimization_level_asked(cli, digits_cnn_checkpoint, tmp_path):
    import compress
    from compress.export.onnx import export_onnx

    model = compress.load(digits_cnn_checkpoint).eval()
    paths = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for path in paths:
        export_onnx(model, torch.zeros(1, 1, 8, 8), path)
    result = cli("bench", *paths, "--input-shape", "1,8,8", "--batch-sizes", "1", "--iters", "3",
                 "--optimization", "basic", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert (report["optimization"], report["spinning"], report["interleaved"]) == ("basic", False, True)
    assert [(m["optimization"], m["spinning"]) for m in report["models"]] == [("basic", False)] * 2
    assert all(m["latency"]["1"]["p50_ms"] > 0 for m in report["models"])
    single = cli("bench", paths[0], "--input-shape", "1,8,8", "--batch-sizes", "1", "--iters", "3")
    assert single.out.splitlines()[-1].startswith("(onnxruntime optimization all, thread spinning on;")  # as deployed
    for level in ("all", "disabled"):
        checked = cli("check", paths[0], "--reference", digits_cnn_checkpoint, "--data", "digits:test",
                      "--optimization", level, "--report", tmp_path / f"check_{level}.json")
        doc = json.loads((tmp_path / f"check_{level}.json").read_text())
        assert checked.code == 0 and doc["optimization"] == level
        # the float graph at any level predicts as torch does; one of 360 samples may flip on a float near-tie
        assert doc["samples"] == 360 and doc["agreement"] >= 359 / 360
    assert cli("bench", paths[0], "--input-shape", "1,8,8", "--optimization", "max").code == 2
