"""``compress bench`` on an ONNX file alone: inputs from the file, batch sizes as 1,8,32, a time budget, whole names.

Graphs are written with ``onnx.helper`` (tests/helpers_onnx.py): a relu (and a mask) is enough to time.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from helpers_onnx import relu_graph

from compress.export.bench import round_robin_ms
from compress.export.declared_inputs import declared_inputs, sample_from_declared


def test_inputs_come_from_the_onnx_file(cli, tmp_path) -> None:
    model = relu_graph(tmp_path / "m.onnx", ["batch", 3, 8])
    result = cli("bench", model, "--batch-sizes", "1,4", "16", "--iters", "3", "--warmup", "0", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["batch_sizes"] == [1, 4, 16] and report["iters"] == 3
    assert {bs: t["runs"] for bs, t in report["models"][0]["latency"].items()} == {"1": 3, "4": 3, "16": 3}


def test_several_inputs_each_of_its_declared_dtype(cli, tmp_path) -> None:
    model = relu_graph(tmp_path / "two.onnx", ["batch", 4], ["batch", "seq"])
    assert [(d.name, d.dims, d.dtype) for d in declared_inputs(model)] == [
        ("x", ("batch", 4), torch.float32), ("mask", ("batch", "seq"), torch.int64)]
    sample = sample_from_declared(model, {"mask": [4]}, [1, 8])
    assert isinstance(sample, dict) and list(sample) == ["x", "mask"]
    assert sample["x"].shape == (1, 4) and sample["x"].dtype == torch.float32
    assert torch.equal(sample["mask"], torch.ones(1, 4, dtype=torch.int64))  # a mask that attends
    result = cli("bench", model, "--input-shape", "mask=4", "--batch-sizes", "1", "8", "--iters", "2", "--json")
    assert result.code == 0, result.err
    assert set(json.loads(result.out)["models"][0]["latency"]) == {"1", "8"}


@pytest.mark.parametrize(("dims", "args", "expected"), [
    (["batch", "seq"], [], "m.onnx: input 'x' [batch, seq]: dimension 1 ('seq') is dynamic; give its size with "
                           "--input-shape x=N"),
    ([1, 3], [], "m.onnx: input 'x' [1, 3] has a fixed batch dimension of 1; --batch-sizes 8 cannot run "
                 "(use --batch-sizes 1)"),
    (["batch", 3, 8], ["--input-shape", "3,9"], "--input-shape 3,9: {dir}/m.onnx: input 'x' [batch, 3, 8] takes "
                                                "[3, 8] after the batch"),
    (["batch", 3], ["--input-shape", "y=3"], "--input-shape y=...: {dir}/m.onnx has no input 'y' (inputs: x)"),
    (["batch", 3], ["--input-shape", "x=3", "--input-shape", "x=3"], "bench --input-shape: input 'x' is given twice"),
    (["batch", 3], ["--batch-sizes", "1,x"], "argument --batch-sizes: '1,x' is not a batch size or a list like "
                                             "1,8,32 (see 'compress bench --help')"),
    (["batch", 3], ["--seconds", "0"], "bench: --seconds must be in (0, 3600] and --min-iters in [1, 100000], "
                                       "not 0 and 50"),
    (["batch", 3], ["--seconds", "1", "--iters", "5"], "argument --iters: not allowed with argument --seconds "
                                                       "(see 'compress bench --help')"),
])
def test_bad_input_is_one_line_naming_the_input_and_dim(cli, tmp_path, dims, args, expected) -> None:
    model = relu_graph(tmp_path / "m.onnx", dims)
    line = cli("bench", model, "--batch-sizes", "1", "8", *args).error_line()
    if "{dir}" in expected:
        assert line == expected.format(dir=tmp_path)
    else:
        assert line.endswith(expected), line  # after the file's path


def test_several_inputs_need_named_shapes_and_a_file_that_is_onnx(cli, tmp_path) -> None:
    two = relu_graph(tmp_path / "two.onnx", ["batch", "n"], ["batch", "n"])
    assert cli("bench", two, "--input-shape", "4").error_line() == (
        f"--input-shape: {two} takes 2 inputs (x, mask); name each, e.g. --input-shape x=...")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\xff\xff not protobuf")
    assert cli("bench", junk).error_line().startswith(f"{junk}: not a readable ONNX file (")


def test_rounds_follow_the_time_budget_with_a_floor() -> None:
    def nap() -> None:
        time.sleep(0.01)

    # >= 10 ms a call: 50 ms of budget holds at most 5 rounds, and the round that crosses it is the last
    (times,) = round_robin_ms([nap], warmup=0, seconds=0.05, min_iters=2)
    assert 2 <= len(times) <= 6
    (times,) = round_robin_ms([nap], warmup=0, seconds=0.001, min_iters=7)
    assert len(times) == 7  # the floor, though the budget ran out after the first


def test_the_table_prints_whole_paths_and_how_many_runs(cli, tmp_path) -> None:
    folder = tmp_path / ("a-folder-name-long-enough-to-be-cut-by-a-fixed-column-" * 2)
    folder.mkdir()
    model = relu_graph(folder / "model.onnx", ["batch", 3])
    result = cli("bench", model, "--batch-sizes", "1", "--seconds", "0.05", "--min-iters", "7")
    assert result.code == 0, result.err
    header, name, row, footer = result.out.splitlines()
    assert header.split() == ["batch", "p50", "ms", "p90", "ms", "p99", "ms", "samples/s", "runs"]
    assert name == f"{model} (onnxruntime)"
    assert row.split()[0] == "1" and int(row.split()[5]) >= 7
    assert footer.startswith("(onnxruntime optimization all, thread spinning on; about 0.05 s per batch size, "
                             "at least 7 runs")
    assert not math.isnan(float(row.split()[1]))
