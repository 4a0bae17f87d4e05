"""``compress check/bench --data`` with options: the data actually read is named, bad options exit 2."""

from __future__ import annotations

import json
from pathlib import Path


def test_check_names_the_factory_default_split_it_read(cli, mlp_checkpoint: Path, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    result = cli("check", mlp_checkpoint, "--reference", mlp_checkpoint, "--data", "python:helpers_splits:digits",
                 "--report", report)
    assert result.code == 0
    # the factory's default, the train split, is named where the result is
    assert "| 1437 samples of python:helpers_splits:digits?split=train&size=8\n" in result.out
    doc = json.loads(report.read_text())
    assert doc["data_used"] == "python:helpers_splits:digits?split=train&size=8" and doc["samples"] == 1437
    assert doc["data_spec"]["factory"] == "helpers_splits:digits" and doc["data_spec"]["kwargs"] == {}


def test_check_passes_keyword_arguments_both_ways(cli, mlp_checkpoint: Path, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    for data in (("--data", "python:helpers_splits:digits?split=test"),
                 ("--data", "python:helpers_splits:digits", "--data-kwargs", '{"split": "test"}')):
        result = cli("check", mlp_checkpoint, "--reference", mlp_checkpoint, *data, "--report", report, "--json")
        assert result.code == 0
        doc = json.loads(report.read_text())
        assert doc["data_used"] == "python:helpers_splits:digits?split=test&size=8"
        assert doc["samples"] == 360 and doc["data_spec"]["kwargs"] == {"split": "test"}


def test_bad_data_options_exit_2_with_one_line(cli, mlp_checkpoint: Path, tmp_path: Path) -> None:
    ref = ("--reference", mlp_checkpoint, "--report", tmp_path / "r.json")
    message = cli("check", mlp_checkpoint, *ref, "--data", "python:helpers_splits:digits?split").error_line()
    assert message.startswith("--data python:helpers_splits:digits?split: option 'split' is not key=value")
    message = cli("check", mlp_checkpoint, *ref, "--data", "python:helpers_splits:digits", "--data-kwargs",
                  '{"split": ').error_line()
    assert message == ("--data python:helpers_splits:digits: --data-kwargs '{\"split\": ' does not parse as JSON or YAML")
    message = cli("check", mlp_checkpoint, *ref, "--data", "python:helpers_splits:digits?splt=test").error_line()
    assert message == ("--data python:helpers_splits:digits?splt=test: helpers_splits:digits takes no argument "
                       "'splt'; did you mean 'split'? (takes split, size)")
    assert not (tmp_path / "r.json").exists()
    message = cli("bench", mlp_checkpoint, "--input-shape", "1,8,8", "--data-kwargs", "{a: 1}").error_line()
    assert message == "--data-kwargs: needs --data"


def test_bench_takes_the_shape_from_data_options(cli, mlp_checkpoint: Path) -> None:
    result = cli("bench", mlp_checkpoint, "--data", "digits:test?size=16", "--batch-sizes", "1", "--iters", "1",
                 "--warmup", "0", "--json")
    # digits_mlp is built for 8x8 inputs: 16x16 from the option reaches the model, and it refuses them
    assert result.code == 2 and "16, 16]" in result.err
