"""Shared fixtures for the compress test-suite.

Everything here is small and offline: models come from ``compress.zoo`` at tiny widths, data is
scikit-learn's ``load_digits`` (the ``digits`` source) or arrays written into ``tmp_path``.

Fixtures (use them by naming them as test arguments):

- ``write_recipe``   -- ``write_recipe(text, name="recipe.yaml") -> Path``: dedent and write a recipe.
- ``mlp_checkpoint`` -- a compress checkpoint of ``digits_mlp(hidden=8)`` (seeded, untrained).
- ``cli``            -- ``cli("run", path, "--out", dir) -> CliResult``: run ``compress.cli.main``
                        in-process, capturing stdout/stderr; ``result.error_line()`` asserts the
                        one-line error contract and returns the message.
- ``finished_run``   -- a copy (per test) of a completed tiny ``compress run``: ``.recipe``, ``.run_dir``.
- ``snapshot_tree``  -- ``snapshot_tree(dir) -> {relative path: bytes}`` to prove files are untouched.

- ``tiny_recipe_text`` -- the text of ``TINY_RECIPE``, a valid recipe that runs in seconds.

Use the fixtures rather than ``from conftest import ...`` (conftest is not an importable module
under every pytest import mode). Python data factories for recipes live in ``tests/helpers_data.py``
and are referenced as ``helpers_data:FN``; this file puts the tests folder on ``sys.path``.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import compress
from compress.cli import main as cli_main
from compress.models import build

TESTS_DIR = Path(__file__).resolve().parent
# Data factories used by recipes live in tests/helpers_data.py and are named "helpers_data:fn".
# Put the tests folder on sys.path whatever pytest's import mode or the presence of __init__.py.
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

#: A recipe that validates and runs in a couple of seconds on a CPU: a 610-parameter MLP,
#: 128 training digits, one epoch. Tests ``.replace()`` parts of it to break one thing at a time.
#: Line numbers are relied on by tests (e.g. ``lr`` is on line 10).
TINY_RECIPE = """\
name: tiny
model:
  factory: compress.zoo:digits_mlp
  kwargs: {hidden: 8}
data:
  train: {source: digits, split: train, limit: 128}
  eval: {source: digits, split: test}
stages:
  - train:
      finetune: {epochs: 1, lr: 0.05}
"""


class CliResult(NamedTuple):
    """What ``compress.cli.main`` returned and printed."""

    code: int
    out: str
    err: str

    def error_line(self) -> str:
        """Assert exit code 2 and exactly one stderr line ``compress: error: ...``; return that message."""
        assert self.code == 2, f"expected exit code 2, got {self.code}; stderr:\n{self.err}"
        lines = [ln for ln in self.err.splitlines() if ln.strip()]
        assert len(lines) == 1, f"expected a one-line error, got {len(lines)} lines:\n{self.err}"
        assert lines[0].startswith("compress: error: "), lines[0]
        assert "Traceback" not in self.err
        return lines[0].removeprefix("compress: error: ")


@dataclass(frozen=True)
class FinishedRun:
    """A completed ``compress run`` of ``TINY_RECIPE``: the recipe file and its run directory."""

    recipe: Path
    run_dir: Path


@pytest.fixture
def tiny_recipe_text() -> str:
    """The text of :data:`TINY_RECIPE` (a valid, fast recipe)."""
    return TINY_RECIPE


@pytest.fixture
def write_recipe(tmp_path: Path) -> Callable[..., Path]:
    """``write_recipe(text, name="recipe.yaml") -> Path``: dedent ``text`` and write it under tmp_path."""

    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """``cli(*args) -> CliResult``: ``compress.cli.main([...])`` in-process with --quiet output captured.

    Paths may be given as ``Path`` objects. Output captured before the call is discarded.
    """

    def run(*args: object) -> CliResult:
        capsys.readouterr()
        code = cli_main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def _save_mlp(path: Path) -> Path:
    torch.manual_seed(0)
    model = build("compress.zoo:digits_mlp", {"hidden": 8})
    compress.save(model, path)
    return path


@pytest.fixture
def mlp_checkpoint(tmp_path: Path) -> Path:
    """A compress checkpoint (``compress.save``) of ``compress.zoo:digits_mlp`` with ``hidden=8``."""
    return _save_mlp(tmp_path / "mlp.pt")


@pytest.fixture(scope="session")
def _finished_run_template(tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    root = tmp_path_factory.mktemp("finished")
    recipe = root / "recipe.yaml"
    recipe.write_text(TINY_RECIPE)
    run_dir = root / "run"
    code = cli_main(["run", str(recipe), "--out", str(run_dir), "--quiet"])
    assert code == 0, "the tiny recipe must run cleanly"
    return FinishedRun(recipe, run_dir)


@pytest.fixture
def finished_run(_finished_run_template: FinishedRun, tmp_path: Path) -> FinishedRun:
    """A private copy of a completed tiny run (recipe + run dir) that a test may damage freely."""
    dest = tmp_path / "finished"
    shutil.copytree(_finished_run_template.recipe.parent, dest)
    return FinishedRun(dest / "recipe.yaml", dest / "run")


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def snapshot_tree() -> Callable[[Path], dict[str, bytes]]:
    """``snapshot_tree(dir) -> {relative path: bytes}`` of every file below ``dir``."""
    return _snapshot


@pytest.fixture(scope="session")
def digits_cnn_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``compress.zoo:digits_cnn`` trained on digits (8 epochs, ~99% test top1), saved with compress.save."""
    from compress.data import build_loader
    from compress.recipe import DigitsData

    torch.manual_seed(0)
    model = build("compress.zoo:digits_cnn", {"num_classes": 10})
    train = build_loader(DigitsData(source="digits", split="train", batch_size=64), "train", train=True)
    # reshard: the recipe runner's seeded batches (last partial batch dropped), the model every figure in the
    # tests that use this checkpoint was measured on; a loader as given trains a slightly different one
    compress.finetune(model, train, compress.FinetuneConfig(epochs=8, lr=0.05, seed=0), progress=False, reshard=True)
    path = tmp_path_factory.mktemp("digits_cnn") / "model.pt"
    compress.save(model, path)
    return path
