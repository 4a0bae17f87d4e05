"""CLI habits: --version, --help without torch, help on every flag, logging levels, a closed pipe."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from helpers_onnx import relu_graph

from compress.cli import _parser

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

# `python -m compress ARGS` for each ARGS in one interpreter, then which heavy modules it had imported
_HELP_PROBE = """
import contextlib, io, runpy, sys
for argv in (["--help"], ["run", "--help"], ["validate", "--help"], ["check", "--help"], ["bench", "--help"],
             ["--version"]):
    sys.argv = ["compress", *argv]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            runpy.run_module("compress", run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            assert exc.code == 0, (argv, exc.code)
    assert out.getvalue().startswith("usage: compress" if argv != ["--version"] else "compress "), argv
print(sorted(m for m in ("torch", "numpy", "onnx", "onnxruntime") if m in sys.modules))
"""


def test_help_and_version_do_not_import_torch() -> None:
    """--help took 3-4 s and ~950 MB because it imported torch; deterministic proxy: torch is never imported."""
    done = subprocess.run([sys.executable, "-c", _HELP_PROBE], capture_output=True, text=True, env=ENV, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_import_compress_is_lazy_but_the_api_is_whole() -> None:
    probe = ("import sys, compress; assert 'torch' not in sys.modules; "
             "assert callable(compress.prune.channels) and callable(compress.export.onnx); "
             "assert compress.CompressError.__module__ == 'compress.errors'; "
             "from compress import *; assert callable(load) and callable(finetune); print('ok')")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    from compress.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"compress {metadata.version('compress')}\n"


def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    top = _parser()
    found = [("compress", top)]
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            found += [(f"compress {name}", sub) for name, sub in action.choices.items()]
    return found


def test_every_flag_of_every_command_has_help() -> None:
    parsers = _parsers()
    assert [name for name, _ in parsers] == ["compress", "compress run", "compress validate",
                                             "compress sensitivity", "compress check", "compress bench"]
    missing = [f"{name} {action.option_strings or action.dest}" for name, parser in parsers
               for action in parser._actions if not action.help or action.help == argparse.SUPPRESS]
    assert missing == []


def test_batch_sizes_take_commas_and_spaces() -> None:
    parser = _parser()
    for argv in (["1,8,32"], ["1", "8", "32"], ["1,8", "32"]):
        args = parser.parse_args(["bench", "m.onnx", "--batch-sizes", *argv])
        assert [b for group in args.batch_sizes for b in group] == [1, 8, 32]


@pytest.mark.parametrize(("where", "argv"), [("before", ["--quiet", "bench", "m.onnx"]),
                                             ("after", ["bench", "m.onnx", "--quiet"])])
def test_quiet_and_verbose_are_taken_before_or_after_the_command(where: str, argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    assert args.quiet is True and not getattr(args, "verbose", False)


def test_stage_lines_go_through_the_compress_logger(cli, write_recipe, tiny_recipe_text, tmp_path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    recipe = write_recipe(tiny_recipe_text)
    with caplog.at_level(logging.DEBUG, logger="compress"):
        shown = cli("run", recipe, "--out", tmp_path / "a")
    assert shown.code == 0, shown.err
    logged = [r.getMessage() for r in caplog.records if r.name == "compress" and r.levelno == logging.INFO]
    assert len(logged) >= 2 and any("train" in line for line in logged)
    # the default output is the logged text as it is, one line each (no level or logger prefix)
    assert [line for line in shown.err.splitlines() if line in logged] == logged
    assert not any(line.startswith(("INFO", "compress:")) for line in shown.err.splitlines())
    caplog.clear()
    quiet = cli("--quiet", "run", recipe, "--out", tmp_path / "b")
    assert quiet.code == 0 and not any(line in quiet.err for line in logged)


def test_verbose_adds_debug_lines_and_json_stays_clean(cli, tmp_path) -> None:
    model = relu_graph(tmp_path / "m.onnx", ["batch", 3])
    args = ("bench", model, "--batch-sizes", "1", "--iters", "2", "--warmup", "0", "--json")
    plain, verbose = cli(*args), cli("-v", *args)
    assert plain.code == verbose.code == 0
    assert "inputs read from" not in plain.err and f"bench: inputs read from {model}: x [1, 3] float32" in verbose.err
    assert json.loads(verbose.out)["models"][0]["path"] == str(model)  # stdout: the JSON alone
    assert cli("--quiet", "--verbose", *args).error_line() == "--quiet and --verbose: pick one"


def test_closed_stdout_ends_quietly_with_141(tmp_path) -> None:
    """``compress bench ... --json | head -c 10``: the reader is gone before the JSON is written."""
    model = relu_graph(tmp_path / "m.onnx", ["batch", 3])
    proc = subprocess.Popen([sys.executable, "-m", "compress", "bench", str(model), "--batch-sizes", "1", "--iters",
                             "2", "--warmup", "0", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    assert proc.stdout is not None
    proc.stdout.close()  # no reader left: the child's first write to stdout fails with EPIPE
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141
    assert err.decode() == ""
