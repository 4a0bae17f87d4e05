"""A checkpoint names the factory that rebuilds its model: only trusted factories are ever called."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_errors import one_line_error

import compress
from compress.errors import CheckpointError

HOSTILE = [
    "os:system",  # {command: ...}
    "subprocess:check_call",
    "torchvision.models.resnet:torch.hub.load",  # a trusted module's import, reached through it
    "torchvision.models:_utils.handle_legacy_interface",  # a private name
]


def _hostile(path: Path, factory: str, marker: Path) -> Path:
    """A well-formed, pickle-free compress checkpoint whose factory would create ``marker`` if called."""
    kwargs = {"command": f"touch {marker}"} if factory == "os:system" else {"args": ["touch", str(marker)]}
    torch.save({"format": "compress.checkpoint", "version": 1, "factory": factory, "kwargs": kwargs,
                "structure": [], "state_dict": {}, "metadata": {}}, path)
    return path


@pytest.mark.parametrize("factory", HOSTILE)
def test_no_entry_point_calls_a_factory_a_file_names(factory, tmp_path, cli, write_recipe, mlp_checkpoint) -> None:
    marker = tmp_path / "marker"
    bad = _hostile(tmp_path / "bad.pt", factory, marker)
    message = one_line_error(CheckpointError, compress.load, bad)
    assert f"names factory '{factory}'" in message or "reaches through" in message, message
    runs = [
        ("check", bad, "--reference", mlp_checkpoint, "--data", "digits:test", "--report", tmp_path / "c.json"),
        ("check", mlp_checkpoint, "--reference", bad, "--data", "digits:test", "--report", tmp_path / "c.json"),
        ("bench", bad, "--input-shape", "1,8,8", "--iters", "1"),
    ]
    recipe = write_recipe(f"name: hostile\nmodel: {{checkpoint: {bad}}}\n"
                          "data: {eval: {source: digits, split: test}}\nstages: []\n")
    runs += [("validate", recipe), ("run", recipe, "--out", tmp_path / "run", "--quiet")]
    for args in runs:
        result = cli(*args)
        assert result.code == 2 and result.err.count("\n") == 1, (args, result.err)
        assert "--trust" in result.err or "reaches through" in result.err, result.err
    assert not marker.exists()  # nothing ran


def test_trusted_factories_load_and_a_named_module_can_be_trusted(tmp_path, cli, mlp_checkpoint) -> None:
    compress.load(mlp_checkpoint)  # compress.zoo: trusted
    torchvision = pytest.importorskip("torchvision")
    compress.save(compress.build("torchvision.models:resnet18", {"num_classes": 3}), tmp_path / "r.pt")
    assert isinstance(compress.load(tmp_path / "r.pt"), torchvision.models.ResNet)
    compress.save(compress.build("helpers_models:tiny_linear"), tmp_path / "own.pt")
    message = one_line_error(CheckpointError, compress.load, tmp_path / "own.pt")
    assert "pass --trust helpers_models (in a recipe: model.trust: [helpers_models])" in message
    assert isinstance(compress.load(tmp_path / "own.pt", trust=["helpers_models"]), torch.nn.Module)
    result = cli("bench", tmp_path / "own.pt", "--input-shape", "4", "--iters", "1", "--trust", "helpers_models")
    assert result.code == 0, result.err
    assert cli("bench", tmp_path / "own.pt", "--input-shape", "4", "--trust", "../evil").code == 2


def test_a_recipe_trusts_what_it_names(tmp_path, cli, write_recipe) -> None:
    compress.save(compress.build("helpers_models:tiny_linear"), tmp_path / "own.pt")
    body = ("name: own\nmodel: {{checkpoint: {ckpt}{more}}}\n"
            "data: {{eval: {{source: npz, path: {npz}, y: null}}}}\nmetric: agreement\nstages: []\n")
    np.savez(tmp_path / "x.npz", x=np.zeros((4, 4), np.float32))
    refused = cli("validate", write_recipe(body.format(ckpt=tmp_path / "own.pt", more="", npz=tmp_path / "x.npz")))
    assert refused.code == 2 and "model.trust: [helpers_models]" in refused.err
    trusted = body.format(ckpt=tmp_path / "own.pt", more=", trust: [helpers_models]", npz=tmp_path / "x.npz")
    assert cli("validate", write_recipe(trusted)).code == 0
    named = body.format(ckpt=tmp_path / "own.pt", more=", factory: 'helpers_models:tiny_linear'", npz=tmp_path / "x.npz")
    assert cli("validate", write_recipe(named)).code == 0  # the user named this factory
    bad = cli("validate", write_recipe(body.format(ckpt=tmp_path / "own.pt", more=", trust: [a/b]", npz=tmp_path / "x.npz")))
    assert bad.code == 2 and "model.trust" in bad.err and "not a module name" in bad.err
