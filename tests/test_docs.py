"""The docs hold together: README.md stays short, every relative link and #anchor in README.md and docs/*.md
resolves inside the repository, and every runnable Python block of docs/python-api.md runs.

Anchors are GitHub's heading slugs (lower case; punctuation other than ``-`` and ``_`` dropped; spaces to
``-``; a repeated heading gets ``-1``, ``-2``). A Python block is runnable when the line before its fence is
``<!-- run -->``; ``<!-- setup -->`` marks the one block whose names every runnable block starts from.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import compress

ROOT = Path(__file__).parents[1]
README_LIMIT = 10 * 1024  # bytes: issue 20's "README <= 10 KB"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
API = ROOT / "docs" / "python-api.md"
# One intra-op thread in the subprocess: on a machine shared by several test runs, torch's default (a thread per
# core, spinning while idle) made one digits_cnn epoch take 37 s instead of 0.6 s (load 10 on 2 cores).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

_FENCE = re.compile(r"^(```|~~~)")
_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, with inline code spans blanked."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, re.sub(r"`[^`]*`", lambda m: " " * len(m.group(0)), line)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w: letters, digits, _ (Unicode, as GitHub)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    counts: dict[str, int] = {}
    text = path.read_text(encoding="utf-8")
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        match = None if fenced else _HEADING.match(line)
        if match:
            base = slug(match.group(2))
            n = counts.get(base, 0)
            counts[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    found |= set(re.findall(r'<a\s+(?:name|id)="([^"]+)"', text))
    return found


def links(path: Path) -> list[tuple[int, str]]:
    return [(n, m.group(1)) for n, line in prose_lines(path.read_text(encoding="utf-8")) for m in _LINK.finditer(line)]


def test_the_docs_exist_and_the_readme_is_at_most_10_kb() -> None:
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes > {README_LIMIT}: move detail into docs/"
    names = {p.name for p in DOCS}
    for required in ("recipe.md", "python-api.md", "cli.md", "deployment.md", "drift.md", "benchmarks.md",
                     "development.md"):
        assert required in names


def test_slugs_follow_github() -> None:
    assert slug("INT8: PTQ, QAT and the two export targets") == "int8-ptq-qat-and-the-two-export-targets"
    assert slug("2:4 structured sparsity") == "24-structured-sparsity"
    assert slug("compress.finetune, FinetuneConfig and Callback") == "compressfinetune-finetuneconfig-and-callback"
    assert slug("Checking drift: `compress check`") == "checking-drift-compress-check"
    assert slug("compress.load_recipe and Recipe") == "compressload_recipe-and-recipe"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves_inside_the_repository(doc: Path) -> None:
    problems = []
    for number, target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        where = f"{doc.relative_to(ROOT)}:{number} {target}"
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.is_relative_to(ROOT.resolve()):
            problems.append(f"{where}: points outside the repository")
            continue
        if not dest.exists():
            problems.append(f"{where}: no such file")
            continue
        if anchor:
            if dest.suffix != ".md" or dest.is_dir():
                problems.append(f"{where}: an anchor into a file that is not Markdown")
            elif anchor not in anchors(dest):
                problems.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(ROOT.resolve())}")
    assert not problems, "\n".join(problems)


def runnable_blocks(path: Path) -> tuple[str, list[tuple[int, str]]]:
    """The setup block and the runnable blocks (line number of the fence, code)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    setup, blocks = "", []
    for i, line in enumerate(lines):
        if line.strip() == "```python" and i > 0 and lines[i - 1].strip() in ("<!-- run -->", "<!-- setup -->"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            code = "\n".join(lines[i + 1:end]) + "\n"
            if lines[i - 1].strip() == "<!-- setup -->":
                assert not setup, f"{path.name}:{i + 1}: a second setup block"
                setup = code
            else:
                blocks.append((i + 1, code))
    return setup, blocks


# Runs the setup once, then each block in a fresh namespace (the setup's names; modules deep-copied, so a block
# that prunes `model` in place leaves the next one its own copy) and a fresh working folder.
_RUNNER = r"""
import copy, json, os, sys, tempfile, time, traceback
import torch
setup, blocks = json.loads(sys.stdin.read())
base = {"__name__": "__docs__"}
os.chdir(tempfile.mkdtemp())
exec(compile(setup, "setup", "exec"), base)
failed = 0
for line, code in blocks:
    ns = {k: copy.deepcopy(v) if isinstance(v, torch.nn.Module) else v for k, v in base.items()}
    os.chdir(tempfile.mkdtemp())
    start = time.perf_counter()
    try:
        exec(compile(code, f"python-api.md block at line {line}", "exec"), ns)
        print(f"block {line}: ok {time.perf_counter() - start:.1f} s", flush=True)
    except BaseException:
        failed += 1
        print(f"block {line}: FAILED\n{traceback.format_exc()}", flush=True)
sys.exit(1 if failed else 0)
"""


@pytest.mark.slow
def test_every_runnable_block_of_the_python_api_page_runs(tmp_path) -> None:
    setup, blocks = runnable_blocks(API)
    assert setup and len(blocks) >= 10
    proc = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps([setup, blocks]), capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env={**os.environ, **ONE_THREAD, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.stdout.count(": ok ") == len(blocks), proc.stdout


def test_every_public_name_has_a_runnable_example() -> None:
    """Each name of compress.__all__ is used (``compress.NAME``) in a runnable block of docs/python-api.md."""
    setup, blocks = runnable_blocks(API)
    code = setup + "".join(c for _, c in blocks)
    missing = [name for name in compress.__all__ if not re.search(rf"\bcompress\.{name}\b", code)]
    assert not missing, f"docs/python-api.md has no runnable example using {missing}"


@pytest.mark.slow
def test_the_readme_quickstart_recipe_validates_on_a_users_image_folders(tmp_path, monkeypatch, cli) -> None:
    """The README's recipe, as a user would save it, next to their own ImageFolder data and a plain resnet18
    state_dict: `compress validate` accepts it (model, checkpoint, data, prune dry run, trial export)."""
    import torch
    import torchvision
    from PIL import Image

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    recipe = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 10), ("test", 3)):
        for c in range(10):
            folder = tmp_path / "data" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "my_resnet18.pt")
    (tmp_path / "my.yaml").write_text(recipe)
    monkeypatch.chdir(tmp_path)
    result = cli("validate", "my.yaml")
    assert result.code == 0, result.err
    assert "valid" in result.out and "dry run: MACs / 2.0" in result.out


def test_the_readme_test_command_is_what_ci_runs() -> None:
    """README's two commands are `make demo` and `make test`; .ci/run runs exactly `make test`, and `make setup`
    installs the dev extra, so a fresh machine has everything the suite imports."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert re.search(r"^make test\b", readme, re.M) and re.search(r"^make demo\b", readme, re.M)
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1].strip() == "make test"
    assert "-e '.[dev]'" in (ROOT / "Makefile").read_text()
