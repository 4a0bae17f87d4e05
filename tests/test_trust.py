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
        assert f"names factory '{factory}'" in result.err or "reaches through" in result.err, result.err
    assert not marker.exists()  # nothing ran
    if factory.startswith(("os:", "subprocess:")):  # no hint to trust a module that can call anything
        assert "cannot be trusted" in message and "--trust" not in message


class _Touch:
    """Unpickling this runs a command: what a planted file in torch's hub cache could hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_trusted_builder_never_fetches_or_unpickles_pretrained_weights(tmp_path, monkeypatch) -> None:
    """torchvision unpickles (weights_only=False) what it downloads or finds in its cache: a file's
    `weights=` argument is dropped, the checkpoint's own weights are what load."""
    pytest.importorskip("torchvision")
    import pickle

    marker = tmp_path / "marker"
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "resnet18-f37072fd.pth").write_bytes(pickle.dumps(_Touch(marker)))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    real = compress.build("torchvision.models:resnet18", {"num_classes": 10})
    payload = {"format": "compress.checkpoint", "version": 1, "factory": "torchvision.models:resnet18",
               "kwargs": {"weights": "IMAGENET1K_V1"}, "structure": [], "state_dict": real.state_dict(), "metadata": {}}
    torch.save(payload, tmp_path / "w.pt")
    message = one_line_error(CheckpointError, compress.load, tmp_path / "w.pt")  # 1000 classes built, 10 saved
    assert "fc.weight" in message and not marker.exists()
    compress.save(compress.build("torchvision.models:resnet18", {"num_classes": 10, "weights": None}), tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True)["kwargs"] == {"num_classes": 10}  # never saved either


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
    for untrustable in ("os", "subprocess", "compress.models", "torch.hub"):  # they can call anything
        result = cli("bench", tmp_path / "own.pt", "--input-shape", "4", "--trust", untrustable)
        assert result.code == 2 and "cannot be trusted" in result.err
    assert "not one string" in one_line_error(compress.errors.CompressError, compress.load, tmp_path / "own.pt",
                                              trust="helpers_models")


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


def test_a_run_allows_exactly_the_model_factories_its_recipe_names(write_recipe) -> None:
    """Not the modules of data factories, and not whole modules: a teacher or resume file naming another
    callable of a module the recipe uses for data is refused."""
    from compress.recipe import load_recipe
    from compress.stages.context import recipe_factories

    recipe = load_recipe(write_recipe("""
        name: r
        model: {factory: 'compress.zoo:digits_cnn'}
        data:
          train: {source: python, factory: 'helpers_data:digits_like'}
          eval: {source: digits, split: test}
        stages:
          - distill: {teacher: {factory: 'helpers_models:two_inputs'}, finetune: {epochs: 1}}
        """))
    assert recipe_factories(recipe) == ["compress.zoo:digits_cnn", "helpers_models:two_inputs"]


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a" * 101])
def test_names_that_would_escape_or_hide_the_run_folder_are_refused(name, tmp_path, cli, write_recipe) -> None:
    recipe = write_recipe(f"name: '{name}'\nmodel: {{factory: 'compress.zoo:digits_mlp'}}\n"
                          "data: {eval: {source: digits, split: test}}\nstages: []\n")
    result = cli("validate", recipe)
    assert result.code == 2 and result.err.count("\n") == 1 and "name:" in result.err


def test_out_never_points_at_the_current_folder_or_above(tmp_path, cli, write_recipe, monkeypatch) -> None:
    recipe = write_recipe("name: r\nmodel: {factory: 'compress.zoo:digits_mlp'}\n"
                          "data: {eval: {source: digits, split: test}}\nstages: []\n")
    work = tmp_path / "work"
    work.mkdir()
    (work / "model.pt").write_text("the user's file")
    monkeypatch.chdir(work)
    for out in ("", ".", "..", str(tmp_path)):
        result = cli("run", recipe, "--out", out, "--quiet")
        assert result.code == 2 and "is the current directory or a folder above it" in result.err, out
    assert (work / "model.pt").read_text() == "the user's file" and sorted(p.name for p in work.iterdir()) == ["model.pt"]
