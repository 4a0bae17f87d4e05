"""Optional dependencies are extras: without matplotlib and scikit-learn, compress imports, runs a recipe that
uses neither (the report written with a note in place of the plots), and names the extra to install when a
feature needs one. Each case runs in a subprocess whose imports of those packages fail, as on a machine
where ``pip install compress`` (no extras) was run."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parents[1]

# Run first in the subprocess: matplotlib and sklearn look as if they were not installed.
_WITHOUT = textwrap.dedent("""
    import sys

    sys.modules["matplotlib"] = sys.modules["sklearn"] = None  # import raises ImportError, find_spec gives None
""")


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _WITHOUT + textwrap.dedent(code)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})


def test_the_extras_are_declared() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    dependencies = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "matplotlib" not in dependencies and "scikit-learn" not in dependencies
    for extra in ("plots = [", "digits = [", "dev = [", "bench = [", "tensorrt = [", "transformers = ["):
        assert extra in text
    assert (ROOT / "compress" / "py.typed").is_file()


def test_without_scikit_learn_the_digits_source_names_the_extra(tmp_path) -> None:
    proc = _run("""
        import compress
        from compress.data import build_loader, parse_data_arg
        try:
            build_loader(parse_data_arg("digits:test"), "eval")
        except compress.DataError as exc:
            print("ERROR", exc)
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ERROR eval: the digits source needs scikit-learn: pip install 'compress[digits]'" in proc.stdout


@pytest.mark.slow
def test_without_matplotlib_a_run_writes_its_report_and_says_the_plots_were_skipped(tmp_path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.normal(size=(64, 1, 8, 8)).astype(np.float32),
             y=rng.integers(0, 10, 64))
    (tmp_path / "r.yaml").write_text(textwrap.dedent("""
        name: no-plots
        model: {factory: "compress.zoo:digits_cnn"}
        data:
          train: {source: npz, path: data.npz, batch_size: 32}
          eval:  {source: npz, path: data.npz}
        stages:
          - train: {finetune: {epochs: 1}}
          - export:
              onnx: {target: onnxruntime}
              engine: {backend: onnxruntime, batch_sizes: [1], bench_iters: 0}
              check: {max_drop: 0.5}
    """))
    proc = _run("""
        from compress.cli import main
        code = main(["run", "r.yaml", "--out", "run", "--quiet"])
        import sys
        print("matplotlib imported:", sys.modules["matplotlib"] is not None, "sklearn imported:",
              sys.modules["sklearn"] is not None)
        sys.exit(code)
    """, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "matplotlib imported: False sklearn imported: False" in proc.stdout
    assert "plots skipped: matplotlib is not installed (pip install 'compress[plots]')" in proc.stderr
    report = (tmp_path / "run" / "report.md").read_text()
    assert "_plots skipped: matplotlib is not installed (pip install 'compress[plots]')._" in report
    assert "![" not in report  # no picture link left pointing at a file that was not written
    assert not list((tmp_path / "run").glob("*.png")) and (tmp_path / "run" / "report.json").is_file()
