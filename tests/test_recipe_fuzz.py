"""Fuzz ``compress validate`` with mutants of the shipped recipes (issue 16).

A fixed seed draws a few hundred mutants of ``recipes/*.yaml``: a key deleted, a value of the wrong
type, huge / negative / NaN / infinite numbers, empty and path-like strings, a list for a scalar and
back, unknown keys, stage types swapped or stages reordered. Each goes through ``compress validate``
in-process; the contract is exit 0, or exit 2 with exactly one ``compress: error:`` line and no
traceback. Recipes that name a checkpoint get an untrained ``digits_cnn`` fixture checkpoint (the
shipped ``runs/digits-base/model.pt`` is made by ``make demo``, not by the tests).
"""

from __future__ import annotations

import copy
import math
import random
import sys
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import compress
from compress.cli import main as cli_main
from compress.models import build
from compress.stages.registry import stage_types

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
SEED = 16
MUTANTS = 300

Path_ = tuple[Any, ...]

_WRONG_TYPES: list[Any] = ["text", 3, 2.5, True, None, [1, 2], {"a": 1}, [], {}]
_NUMBERS: list[Any] = [0, -1, -(10**30), 10**30, 2**63, 2**64, 1180591620717411303424, 1e308, -1e-308,
                       math.nan, math.inf, -math.inf, 0.0001, 0.9999, 1.0, 100000]
# Paths that a recipe might name by mistake or malice; "." is the test's own empty temporary folder.
_STRINGS: list[Any] = ["", " ", "../../etc/passwd", "/dev/zero", "/proc/self", "/etc", "/nonexistent/x.pt", ".",
                       "~/x", "a" * 300, "x\0y", "module:callable", "os:system", "stage 99", "baseline", "2:4",
                       "é" * 5, "*", "runs/../..", "cuda:7"]
# Whole data splits swapped in: other sources, hostile paths, and the broken datasets of helpers_data.
_SPLITS: list[dict[str, Any]] = [
    {"source": "npz", "path": "CHECKPOINT"},  # a zip file, but a torch checkpoint rather than arrays
    {"source": "npz", "path": "/dev/zero"}, {"source": "npz", "path": "/proc/self"},
    {"source": "imagefolder", "root": "."}, {"source": "imagefolder", "root": "/proc/self/fd"},
    {"source": "python", "factory": "helpers_data:sized", "kwargs": {"length": -1}},
    {"source": "python", "factory": "helpers_data:float_labels"},
    {"source": "python", "factory": "helpers_data:unlabeled"},
    {"source": "python", "factory": "helpers_data:nan_at"},
    {"source": "python", "factory": "helpers_data:broken"},
    {"source": "python", "factory": "helpers_data:not_a_dataset"},
    {"source": "python", "factory": "helpers_data:digits_like", "kwargs": {"n": 3, "size": 9}},
    {"source": "digits", "split": "test", "size": 16, "channels": 3},
    {"holdout": 0.999}, {"holdout": 0.0001},
]
_PLAUSIBLE: list[Any] = [0, 1, 2, 3, 7, 16, 64, 1000, 0.5, 0.01, 1e-9, 99.0]
_UNKNOWN_KEYS = ["colour", "lr_", "__class__", "epoch", "finetune", "source", "0"]


def _paths(node: Any, here: Path_ = ()) -> Iterator[Path_]:
    """Every key path below ``node`` (dict keys and list indices), depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*here, key)
            yield from _paths(value, (*here, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield (*here, i)
            yield from _paths(value, (*here, i))


def _get(node: Any, path: Path_) -> Any:
    for step in path:
        node = node[step]
    return node


def _set(root: Any, path: Path_, value: Any) -> None:
    _get(root, path[:-1])[path[-1]] = value


def _delete(root: Any, path: Path_) -> None:
    parent = _get(root, path[:-1])
    del parent[path[-1]]


def _mutate(data: dict[str, Any], rng: random.Random, kinds: list[str], words: list[str]) -> str:
    """Apply one random mutation in place; return what it did (for the failure message).

    ``words``: strings the shipped recipes use, so a mutation can also be plausible (a valid value
    in the wrong place) and reach past the schema into model, data and stage checks.
    """
    paths = list(_paths(data))
    path = rng.choice(paths)
    value = _get(data, path)
    op = rng.choice(["delete", "wrong_type", "number", "string", "list_scalar", "unknown_key", "stage", "plausible",
                     "split"])
    if op == "split":
        split = rng.choice(["train", "val", "calibration", "eval"])
        new = copy.deepcopy(rng.choice(_SPLITS))
        if new.get("path") == "CHECKPOINT":
            new["path"] = data["model"].get("checkpoint") or "model.pt" if isinstance(data.get("model"), dict) else "x"
        data.setdefault("data", {})
        if isinstance(data["data"], dict):
            data["data"][split] = new
        return f"data.{split} = {new!r}"
    if op == "plausible":
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            new = not value if isinstance(value, bool) else rng.choice(words)
        else:
            new = rng.choice(words) if isinstance(value, str) else rng.choice(_PLAUSIBLE)
        _set(data, path, new)
        return f"set {path} = {new!r}"
    if op == "delete":
        _delete(data, path)
        return f"delete {path}"
    if op == "wrong_type":
        new = rng.choice(_WRONG_TYPES)
    elif op == "number":
        numbers = [p for p in paths if isinstance(_get(data, p), int | float) and not isinstance(_get(data, p), bool)]
        path = rng.choice(numbers or paths)
        new = rng.choice(_NUMBERS)
    elif op == "string":
        strings = [p for p in paths if isinstance(_get(data, p), str)]
        path = rng.choice(strings or paths)
        new = rng.choice(_STRINGS)
    elif op == "list_scalar":
        new = (value[0] if value else None) if isinstance(value, list) else [value, value] if rng.random() < 0.5 else [value]
    elif op == "unknown_key":
        dicts = [p for p in [(), *paths] if isinstance(_get(data, p), dict)]
        target = _get(data, rng.choice(dicts))
        key = rng.choice(_UNKNOWN_KEYS)
        target[key] = rng.choice([1, "x", None, {"a": 1}])
        return f"unknown key {key!r}"
    else:  # stages: another type with the same options, two swapped, one duplicated, or all dropped
        stages = data.get("stages")
        if not isinstance(stages, list) or not stages:
            data["stages"] = rng.choice([None, "train", [None], [{}]])
            return f"stages = {data['stages']!r}"
        i = rng.randrange(len(stages))
        how = rng.choice(["retype", "swap", "duplicate", "drop"])
        if how == "retype" and isinstance(stages[i], dict) and len(stages[i]) == 1:
            (options,) = stages[i].values()
            kind = rng.choice(kinds)
            stages[i] = {kind: options}
            return f"stage {i} retyped {kind}"
        if how == "swap" and len(stages) > 1:
            j = rng.randrange(len(stages))
            stages[i], stages[j] = stages[j], stages[i]
            return f"stages {i} <-> {j}"
        if how == "duplicate":
            stages.insert(i, copy.deepcopy(stages[i]))
            return f"stage {i} duplicated"
        del stages[i]
        return f"stage {i} dropped"
    _set(data, path, new)
    return f"set {path} = {new!r}"[:120]


def mutants(checkpoint: Path, count: int = MUTANTS, seed: int = SEED) -> Iterator[tuple[str, str, str]]:
    """``(recipe name, what was mutated, YAML text)`` for ``count`` mutants, drawn with ``seed``."""
    rng = random.Random(seed)
    kinds = sorted(stage_types())
    bases = []
    for path in RECIPES:
        data = yaml.safe_load(path.read_text())
        if data["model"].get("checkpoint"):
            data["model"]["checkpoint"] = str(checkpoint)
        bases.append((path.name, data))
    words = sorted({v for _, data in bases for p in _paths(data) if isinstance(v := _get(data, p), str)}
                   | {"stage 1", "stage 2", "stage 3", *kinds})
    for n in range(count):
        name, base = bases[n % len(bases)]
        data = copy.deepcopy(base)
        done = [_mutate(data, rng, kinds, words) for _ in range(rng.choice([1, 1, 2]))]
        yield name, "; ".join(done), yaml.safe_dump(data, sort_keys=False, allow_unicode=False)


def _validate(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = cli_main(["validate", str(path), "--quiet"])
    except BaseException:  # noqa: BLE001 - anything escaping main is the bug being hunted
        code, err = -1, traceback.format_exc()
        capsys.readouterr()
        return code, err
    return code, capsys.readouterr().err


def _problem(code: int, err: str) -> str | None:
    """What breaks the contract (exit 0, or exit 2 with one 'compress: error:' line), or None."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if "Traceback" in err or code not in (0, 2):
        return f"exit {code}: {err.strip()[-600:]}"
    if code == 2 and (len(lines) != 1 or not lines[0].startswith("compress: error: ")):
        return f"exit 2 with {len(lines)} stderr lines: {err.strip()[:600]}"
    return None


def _warnings_to_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    """Show warnings on stderr as Python does outside pytest (pytest records them), once per place."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001 - Python's signature
        print(warnings.formatwarning(message, category, filename, lineno, line), file=sys.stderr, end="")

    warnings.simplefilter("default")  # pytest restores its own filters after the test
    monkeypatch.setattr(warnings, "showwarning", show)


@pytest.fixture(scope="module")
def cnn_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained ``digits_cnn(num_classes=10)`` saved with ``compress.save`` (what the recipes load)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fuzz") / "model.pt"
    compress.save(build("compress.zoo:digits_cnn", {"num_classes": 10}), path)
    return path


@pytest.mark.slow
def test_recipe_mutants_exit_0_or_one_line_2(cnn_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths in mutants ("." as an image folder) land in an empty folder
    _warnings_to_stderr(monkeypatch)
    outcomes: Counter[str] = Counter()
    problems: list[str] = []
    for i, (name, what, text) in enumerate(mutants(cnn_checkpoint)):
        path = tmp_path / f"mutant{i:03d}.yaml"
        path.write_text(text)
        code, err = _validate(path, capsys)
        outcomes[f"exit {code}"] += 1
        problem = _problem(code, err)
        if problem is not None:
            problems.append(f"mutant {i} of {name} ({what}): {problem}")
    assert not problems, f"{len(problems)} of {MUTANTS} mutants broke the contract ({dict(outcomes)}):\n" + "\n".join(problems)
    # the mutations must exercise both outcomes, or the fuzz tests nothing
    assert outcomes["exit 0"] >= 10 and outcomes["exit 2"] >= MUTANTS // 2, dict(outcomes)


def test_mutants_are_reproducible(cnn_checkpoint: Path) -> None:
    first = [text for _, _, text in mutants(cnn_checkpoint, count=20)]
    again = [text for _, _, text in mutants(cnn_checkpoint, count=20)]
    assert first == again
    assert len(set(first)) == 20  # every draw differs from the others


HOSTILE_OVERRIDES = [
    ".=1", "a..b=1", "stages.-1.x=1", "name.x=1", "stages.5=1", "stages.0.train.finetune=", "=3", "seed", "seed==1",
    "stages.0.train=[1]", "data=null", "stages=null", "stages={}", "model.kwargs.hidden=[", "seed=&a [*a]",
    "seed=!!python/object/apply:os.system [touch marker]", "stages.0.train.finetune.lr=1e400",
    "data.eval.split=!!binary aGVsbG8=", "data.eval.limit=2020-01-01", "stages.1000000000000000000000=1",
    "device=cuda:99999999999999999999", "model.trust=[os]", "data.eval.root=/proc/self", "model.kwargs={hidden: -1}",
]


@pytest.mark.parametrize("override", HOSTILE_OVERRIDES)
def test_hostile_overrides_exit_0_or_one_line_2(cli, write_recipe, tiny_recipe_text, tmp_path, monkeypatch,
                                                override) -> None:
    monkeypatch.chdir(tmp_path)
    _warnings_to_stderr(monkeypatch)
    result = cli("validate", write_recipe(tiny_recipe_text), "--quiet", "--set", override)
    assert _problem(result.code, result.err) is None
    assert not (tmp_path / "marker").exists()  # a YAML tag never runs code


def test_student_that_cannot_run_is_one_line(cli, write_recipe, tiny_recipe_text) -> None:
    """Found by the fuzz (seed 3, mutant 281): a zero-width student crashed the distiller's probe with a traceback."""
    student = "{factory: compress.zoo:digits_cnn, kwargs: {num_classes: 10, width: 0}}"
    recipe = write_recipe(tiny_recipe_text + f"  - distill: {{student: {student}, finetune: {{epochs: 1}}}}\n")
    line = cli("validate", recipe, "--quiet").error_line()
    assert line.startswith(f"{recipe}:11 stages.1.distill: the student fails on an input of shape [1, 1, 8, 8]: ")
