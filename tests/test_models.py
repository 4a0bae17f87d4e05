"""Checkpoints: pickle-free round trip, raw state_dicts, and one-line errors naming the file and keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_errors import one_line_error

import compress
from compress.errors import CheckpointError, CompressError
from compress.models import build, load_model, read_checkpoint

MLP = "compress.zoo:digits_mlp"
CNN = "compress.zoo:digits_cnn"


def test_compress_checkpoint_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = build(CNN, {"width": 4}).eval()
    with torch.no_grad():  # make BatchNorm statistics non-trivial so they must round-trip too
        model.stem[1].running_mean.uniform_(-1, 1)
        model.stem[1].running_var.uniform_(0.5, 2)
    path = tmp_path / "cnn.pt"
    compress.save(model, path, metadata={"note": "x"})
    loaded = compress.load(path).eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    raw = torch.load(path, weights_only=True)  # pickle-free by construction
    assert raw["factory"] == CNN and raw["kwargs"] == {"width": 4} and raw["metadata"] == {"note": "x"}


def test_a_foreign_model_saves_without_a_factory_and_restores_onto_one_the_user_builds(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    compress.save(model, tmp_path / "m.pt")
    message = one_line_error(CheckpointError, compress.load, tmp_path / "m.pt")
    assert "records no factory" in message and "compress.restore(model, path)" in message
    restored = compress.restore(torch.nn.Linear(2, 2), tmp_path / "m.pt")
    assert torch.equal(restored.weight, model.weight) and torch.equal(restored.bias, model.bias)


def test_raw_state_dict_loads_with_a_factory(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = build(MLP, {"hidden": 8})
    path = tmp_path / "raw.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(path, MLP, {"hidden": 8})
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(model(x), loaded(x))


def test_wrapped_state_dict_is_unwrapped(tmp_path: Path) -> None:
    model = build(MLP, {"hidden": 8})
    path = tmp_path / "lightning.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
    loaded = load_model(path, MLP, {"hidden": 8})
    assert torch.equal(loaded[1].weight, model[1].weight)


def test_raw_state_dict_without_factory_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "weights-only.pt"
    torch.save(build(MLP).state_dict(), path)
    message = one_line_error(CheckpointError, load_model, path)
    assert message.startswith(f"checkpoint {path}: is a raw state_dict")
    assert "model.factory" in message


def test_pickled_whole_module_is_refused_and_points_to_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pt"
    torch.save(build(MLP), path)
    message = one_line_error(CheckpointError, load_model, path, MLP)
    assert message.startswith(f"checkpoint {path}: holds pickled Python objects")
    assert "state_dict" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pt"
    assert one_line_error(CheckpointError, load_model, path, MLP) == f"checkpoint {path}: file not found"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    message = one_line_error(CheckpointError, load_model, tmp_path, MLP)
    assert message == f"checkpoint {tmp_path}: is a directory, expected a checkpoint file"


def test_truncated_checkpoint_is_reported_as_corrupt(mlp_checkpoint: Path, tmp_path: Path) -> None:
    data = mlp_checkpoint.read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(data[: len(data) // 2])
    message = one_line_error(CheckpointError, load_model, path)
    assert message.startswith(f"checkpoint {path}: not a readable torch checkpoint (truncated or corrupt?)")


@pytest.mark.parametrize(
    "content",
    [b"", b"hello world", b"\x00" * 64, b'{"json": true}', bytes(range(256))],
    ids=["empty", "text", "zeros", "json", "binary"],
)
def test_garbage_files_are_reported_as_corrupt_not_as_crashes(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    message = one_line_error(CheckpointError, read_checkpoint, path)
    assert message.startswith(f"checkpoint {path}: not a readable torch checkpoint")
    assert "pickled Python objects" not in message  # garbage is not a pickled module


def test_non_dict_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    assert "holds a list, expected a state_dict" in one_line_error(CheckpointError, load_model, path, MLP)


def test_mismatched_architecture_lists_missing_and_unexpected_keys(tmp_path: Path) -> None:
    path = tmp_path / "mlp-weights.pt"
    torch.save(build(MLP, {"hidden": 8}).state_dict(), path)
    message = one_line_error(CheckpointError, load_model, path, CNN, {"width": 4})
    assert message.startswith(f"checkpoint {path} does not match the model:")
    assert "missing keys: stem.0.weight" in message
    assert "(+" in message and "more)" in message  # long lists are cut, with a count
    assert "unexpected keys: 1.weight, 1.bias, 3.weight, 3.bias" in message


def test_shape_mismatch_is_listed_by_name_with_both_shapes(tmp_path: Path) -> None:
    path = tmp_path / "narrow.pt"
    torch.save(build(MLP, {"hidden": 8}).state_dict(), path)
    message = one_line_error(CheckpointError, load_model, path, MLP, {"hidden": 16})
    assert "shape mismatch: 1.weight checkpoint [8, 64] vs model [16, 64]" in message
    assert "3.weight checkpoint [10, 8] vs model [10, 16]" in message


def test_ddp_module_prefix_is_stripped(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = build(MLP, {"hidden": 8})
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    loaded = load_model(path, MLP, {"hidden": 8})
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(model(x), loaded(x))


def test_compress_checkpoint_factory_conflicting_with_recipe(mlp_checkpoint: Path) -> None:
    message = one_line_error(CheckpointError, load_model, mlp_checkpoint, CNN)
    assert message == (
        f"checkpoint {mlp_checkpoint}: was saved from factory '{MLP}', but the recipe says '{CNN}'"
    )


def test_compress_checkpoint_kwargs_conflicting_with_recipe(mlp_checkpoint: Path) -> None:
    message = one_line_error(CheckpointError, load_model, mlp_checkpoint, MLP, {"hidden": 9})
    assert "was saved with kwargs {'hidden': 8}, but the recipe says {'hidden': 9}" in message


def test_compress_checkpoint_with_the_same_factory_is_fine(mlp_checkpoint: Path) -> None:
    model = load_model(mlp_checkpoint, MLP, {"hidden": 8})
    assert model[1].out_features == 8


def test_damaged_compress_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "damaged.pt"
    torch.save({"format": "compress.checkpoint", "version": 1}, path)
    assert "damaged compress checkpoint" in one_line_error(CheckpointError, load_model, path)


def test_compress_checkpoint_from_a_newer_version(mlp_checkpoint: Path) -> None:
    payload = torch.load(mlp_checkpoint, weights_only=True)
    payload["version"] = 99
    torch.save(payload, mlp_checkpoint)
    assert "format version 99 is newer" in one_line_error(CheckpointError, load_model, mlp_checkpoint)


def test_compress_checkpoint_whose_factory_is_gone(mlp_checkpoint: Path) -> None:
    payload = torch.load(mlp_checkpoint, weights_only=True)
    payload["factory"] = "compress.zoo:removed_model"
    torch.save(payload, mlp_checkpoint)
    message = one_line_error(CheckpointError, load_model, mlp_checkpoint)
    assert message.startswith(f"checkpoint {mlp_checkpoint}: cannot rebuild its model")
    assert "'compress.zoo:removed_model'" in message


@pytest.mark.parametrize(
    ("factory", "kwargs", "expected"),
    [
        ("compress.zoo:nope", {}, "module 'compress.zoo' has no attribute 'nope'"),
        ("no_such_pkg.mod:fn", {}, "cannot import module 'no_such_pkg.mod'"),
        (MLP, {"depth": 3}, "unexpected keyword argument 'depth'"),
        (MLP, {"hidden": -1}, "negative dimension"),
        ("os:getcwd", {}, "returned str, not a torch.nn.Module"),
    ],
)
def test_bad_factory_is_bad_input(factory: str, kwargs: dict, expected: str) -> None:
    message = one_line_error(CompressError, build, factory, kwargs)
    assert f"model factory '{factory}'" in message
    assert expected in message
