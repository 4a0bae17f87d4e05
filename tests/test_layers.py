"""The package's layers: a module imports only from its own layer or below, and no imports form a cycle.

Every import counts: module-level, inside functions, and ``import_module("compress....")`` strings.
``from compress import io`` is an edge to ``compress.io`` (not to the package's ``__init__``).

Layers, lowest first (issue 17):

- base: errors, config, imports, io, select, callbacks, structure, ... -- no knowledge of models or data
- core: data, metrics, models, profile, train and the technique packages (quant/, ptq/, qat/, prune/,
  sparsity/, distill/, export/) -- no stage code, no recipe
- stages: ``stages/`` and every ``*/stage.py`` (plus stage-only helpers) -- never another stage
- recipe: recipe.py (YAML, --set, locations)
- app: pipeline, report, rundir, cli, the package ``__init__``

No exemptions: a module that needs something from a higher layer moves that thing down (or asks
through a hook the lower layer offers, as ``structure`` does for per-kind checks and callbacks).
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import compress

LAYERS = ("base", "core", "stages", "recipe", "app")

_BASE = {"errors", "config", "safe_yaml", "imports", "io", "select", "callbacks", "structure", "runlock", "distributed"}
_APP = {"", "__main__", "cli", "pipeline", "report", "rundir"}
# shared stage infrastructure under stages/: any stage may import it (every other module there is one stage type)
_STAGE_INFRA = {"registry", "context", "builtin", "finetune", "order", "quantize", "teacher", "spec", "budget"}


def layer_of(module: str) -> str:
    """The layer of a dotted module name under ``compress``."""
    rel = module.removeprefix("compress").removeprefix(".")
    if rel in _APP:
        return "app"
    if rel == "recipe":
        return "recipe"
    if rel.startswith("stages") or rel.endswith(".stage"):
        return "stages"
    if rel in _BASE:
        return "base"
    return "core"


def stage_package(module: str) -> str | None:
    """The stage a module belongs to (``prune`` for ``compress.prune.stage``), None for shared stage code."""
    rel = module.removeprefix("compress.")
    if rel.endswith(".stage"):
        return rel.removesuffix(".stage")
    if rel.startswith("stages.") and rel.removeprefix("stages.") not in _STAGE_INFRA:
        return rel  # one module per stage type under stages/
    return None


def _modules(root: Path) -> dict[str, Path]:
    found = {}
    for file in root.rglob("*.py"):
        parts = file.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = file
    return found


def _imported(node: ast.AST, package: str, modules: dict[str, Path]) -> Iterator[str]:
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*parts, base] if base else parts)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module":
        if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            names = [node.args[0].value]
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name:
            yield name


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in its body)."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {}
    for name, file in modules.items():
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(file.read_text(), filename=str(file))
        graph[name] = {t for node in ast.walk(tree) for t in _imported(node, package, modules) if t != name}
    return graph


def violations(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Edges that point to a higher layer, or from one stage to another."""
    bad = set()
    for src, targets in graph.items():
        for dst in targets:
            upward = LAYERS.index(layer_of(dst)) > LAYERS.index(layer_of(src))
            own, other = stage_package(src), stage_package(dst)
            if upward or (own is not None and other is not None and own != other):
                bad.add((src, dst))
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


ROOT = Path(compress.__file__).parent


def test_no_import_goes_against_the_layer_order() -> None:
    found = sorted(violations(import_graph(ROOT)))
    assert not found, f"imports against the layer order (see this file's docstring): {found}"


def test_no_import_cycle() -> None:
    assert cycles(import_graph(ROOT)) == []


def _package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "compress" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root / "compress"


def test_a_planted_upward_import_inside_a_function_is_caught(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "__init__.py": "",
        "io.py": "def write():\n    from compress import pipeline  # base reaching up to app\n",
        "pipeline.py": "from compress import io\n",
        "data.py": "import importlib\nimportlib.import_module('compress.recipe')\n",
        "recipe.py": "from . import data\n",
        "prune/__init__.py": "",
        "prune/stage.py": "from compress.sparsity.stage import run\n",
        "sparsity/__init__.py": "",
        "sparsity/stage.py": "def run(): ...\n",
    })
    graph = import_graph(root)
    assert graph["compress.io"] == {"compress.pipeline"}
    assert violations(graph) == {
        ("compress.io", "compress.pipeline"),  # function-local import, upward
        ("compress.data", "compress.recipe"),  # import_module string, upward
        ("compress.prune.stage", "compress.sparsity.stage"),  # a stage importing another stage
    }
    assert cycles(graph) == [["compress.data", "compress.recipe"], ["compress.io", "compress.pipeline"]]


@pytest.mark.parametrize(("module", "layer"), [
    ("compress.errors", "base"), ("compress.models", "core"), ("compress.quant.insert", "core"),
    ("compress.prune.stage", "stages"), ("compress.stages.registry", "stages"), ("compress.recipe", "recipe"),
    ("compress.cli", "app"), ("compress", "app"),
])
def test_layer_map(module: str, layer: str) -> None:
    assert layer_of(module) == layer


def test_tests_mirror_the_source_tree() -> None:
    """Each package under compress/ has its folder of tests under tests/ and every such folder names a package:
    tests for compress/prune/ live in tests/prune/, for compress/stages/ in tests/stages/; modules at the top of
    compress/ (data, models, recipe, pipeline, cli, ...) are tested by files at the top of tests/."""
    tests = Path(__file__).resolve().parent
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    folders = {p.parent.name for p in tests.glob("*/test_*.py")}
    assert folders == packages, f"test folders {sorted(folders)} != packages {sorted(packages)}"
    names = [p.name for p in tests.rglob("test_*.py")]
    assert len(names) == len(set(names)), "test file names must be unique (pytest imports them by basename)"
