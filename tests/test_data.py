"""Data sources: deterministic digits splits, npz/python/imagefolder, and one-line DataErrors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_errors import one_line_error

from compress.data import build_dataset, build_loader, describe_spec, parse_data_arg, stack_inputs
from compress.errors import CompressError, DataError
from compress.recipe import DigitsData, ImageFolderData, NpzData, PythonData


def iterate(loader) -> None:
    for _ in loader:
        pass


# --------------------------------------------------------------------------------------------
# digits


def _digits_rows(split: str) -> set[bytes]:
    x, _ = stack_inputs(build_loader(DigitsData(source="digits", split=split, batch_size=512), "d"))
    return {row.numpy().tobytes() for row in x}


def test_digits_splits_have_fixed_sizes_and_are_deterministic() -> None:
    train = build_dataset(DigitsData(source="digits", split="train"))
    test = build_dataset(DigitsData(source="digits", split="test"))
    assert (len(train), len(test)) == (1437, 360)
    again = build_dataset(DigitsData(source="digits", split="test"))
    assert torch.equal(test.tensors[0], again.tensors[0]) and torch.equal(test.tensors[1], again.tensors[1])
    assert len(build_dataset(DigitsData(source="digits", split="all"))) == 1797


def test_digits_train_and_test_do_not_overlap() -> None:
    train, test = _digits_rows("train"), _digits_rows("test")
    all_rows = _digits_rows("all")
    assert len(train) == 1437 and len(test) == 360  # no two samples alike, so rows identify samples
    assert not train & test
    assert train | test == all_rows


def test_digits_seed_changes_the_split() -> None:
    a = build_dataset(DigitsData(source="digits", split="test", seed=0)).tensors[0]
    b = build_dataset(DigitsData(source="digits", split="test", seed=1)).tensors[0]
    assert a.shape == b.shape and not torch.equal(a, b)


@pytest.mark.parametrize(("size", "channels"), [(8, 1), (16, 1), (8, 3), (32, 3)])
def test_digits_size_and_channels_change_the_shape(size: int, channels: int) -> None:
    x, y = build_dataset(DigitsData(source="digits", split="test", size=size, channels=channels))[0]
    assert tuple(x.shape) == (channels, size, size)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) >= -1.01 and float(x.max()) <= 1.01


def test_limit_cuts_the_dataset() -> None:
    assert len(build_dataset(DigitsData(source="digits", split="train", limit=10))) == 10


# --------------------------------------------------------------------------------------------
# npz


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_with_labels(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((6, 1, 8, 8), dtype=np.float32)
    path = _npz(tmp_path / "d.npz", x=x, y=np.arange(6))
    loader = build_loader(NpzData(source="npz", path=str(path), batch_size=4), "data.eval")
    inputs, labels = stack_inputs(loader)
    assert torch.equal(inputs, torch.from_numpy(x)) and labels.tolist() == list(range(6))


def test_npz_unlabeled_with_y_null(tmp_path: Path) -> None:
    path = _npz(tmp_path / "u.npz", x=np.zeros((5, 4), np.float32))
    inputs, labels = stack_inputs(build_loader(NpzData(source="npz", path=str(path), y=None), "data.eval"))
    assert inputs.shape == (5, 4) and labels is None


def test_npz_missing_label_array_suggests_y_null(tmp_path: Path) -> None:
    path = _npz(tmp_path / "u.npz", x=np.zeros((5, 4), np.float32))
    message = one_line_error(DataError, build_dataset, NpzData(source="npz", path=str(path)), "data.eval")
    assert message == f"data.eval: {path} has no array 'y' (arrays: x); y: null for unlabeled"


def test_npz_with_nan_names_file_and_sample(tmp_path: Path) -> None:
    x = np.zeros((10, 4), np.float32)
    x[7, 1] = np.nan
    x[8, 0] = np.inf
    path = _npz(tmp_path / "nan.npz", x=x, y=np.arange(10))
    message = one_line_error(DataError, build_dataset, NpzData(source="npz", path=str(path)), "data.eval")
    assert message == f"data.eval: {path} array 'x' has 2 NaN/Inf values (first in sample 7)"


def test_npz_length_mismatch(tmp_path: Path) -> None:
    path = _npz(tmp_path / "len.npz", x=np.zeros((10, 4), np.float32), y=np.arange(9))
    message = one_line_error(DataError, build_dataset, NpzData(source="npz", path=str(path)), "data.train")
    assert message == f"data.train: {path} has 10 inputs 'x' but 9 labels 'y'"


def test_npz_with_zero_samples_is_empty(tmp_path: Path) -> None:
    path = _npz(tmp_path / "empty.npz", x=np.zeros((0, 4), np.float32), y=np.zeros(0, np.int64))
    message = one_line_error(DataError, build_dataset, NpzData(source="npz", path=str(path)), "data.eval")
    assert message == f"data.eval: dataset is empty (npz {path})"


def test_npz_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.npz"
    message = one_line_error(DataError, build_dataset, NpzData(source="npz", path=str(path)), "data.eval")
    assert message == f"data.eval: npz file {path} not found"


@pytest.mark.parametrize(
    ("arrays", "expected"),
    [
        ({"images": np.zeros((2, 4), np.float32), "y": np.arange(2)}, "has no array 'x' (arrays: images, y)"),
        ({"x": np.array(["a", "b"]), "y": np.arange(2)}, "array 'x' has dtype <U1; expected numbers"),
        ({"x": np.float32(1.0), "y": np.arange(1)}, "array 'x' is a scalar"),
        ({"x": np.array([1, "a"], dtype=object), "y": np.arange(2)}, "cannot read"),
    ],
    ids=["no-x", "strings", "scalar", "objects"],
)
def test_npz_malformed_arrays(tmp_path: Path, arrays: dict, expected: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    message = one_line_error(DataError, build_dataset, NpzData(source="npz", path=str(path)), "data.eval")
    assert message.startswith("data.eval: ") and str(path) in message and expected in message


def test_npz_that_is_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not numpy at all")
    message = one_line_error(DataError, build_dataset, NpzData(source="npz", path=str(path)), "data.eval")
    assert message == f"data.eval: {path} is not an npz file (save arrays with numpy.savez)"


# --------------------------------------------------------------------------------------------
# python factories (tests/helpers_data.py, on sys.path via conftest)


def test_python_factory_with_kwargs() -> None:
    spec = PythonData(source="python", factory="helpers_data:digits_like", kwargs={"n": 20, "size": 12})
    inputs, labels = stack_inputs(build_loader(spec, "data.train"))
    assert inputs.shape == (20, 1, 12, 12) and labels.tolist()[:11] == [*range(10), 0]


def test_python_factory_nan_sample_fails_at_batch_time_naming_the_sample() -> None:
    spec = PythonData(source="python", factory="helpers_data:nan_at", kwargs={"n": 12, "bad": 5}, batch_size=4)
    loader = build_loader(spec, "data.calibration")  # building is fine: NaN only shows when read
    message = one_line_error(DataError, iterate, loader)
    assert message == "data.calibration: sample 5 contains NaN or Inf inputs"


def test_nan_found_in_a_worker_process_keeps_the_one_line_message() -> None:
    spec = PythonData(source="python", factory="helpers_data:nan_at", kwargs={"bad": 2}, batch_size=4, workers=1)
    message = one_line_error(DataError, iterate, build_loader(spec, "data.eval"))
    assert message == "data.eval: sample 2 contains NaN or Inf inputs"  # not torch's "Caught ... Traceback"


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        ("helpers_data:not_a_dataset", "data.eval: factory 'helpers_data:not_a_dataset' returned int, not a sized Dataset"),
        ("helpers_data:broken", "data.eval: factory 'helpers_data:broken' raised RuntimeError: disk on fire"),
        ("helpers_data:missing", "data.eval.factory 'helpers_data:missing': module 'helpers_data' has no attribute"),
        ("no_such_module:fn", "data.eval.factory 'no_such_module:fn': cannot import module 'no_such_module'"),
    ],
)
def test_python_factory_problems(factory: str, expected: str) -> None:
    message = one_line_error(CompressError, build_dataset, PythonData(source="python", factory=factory), "data.eval")
    assert message.startswith(expected)


# --------------------------------------------------------------------------------------------
# imagefolder


def _image_folder(root: Path, size: int = 10) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


def test_imagefolder_two_classes(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "imgs")
    spec = ImageFolderData(source="imagefolder", root=str(root), resize=8, batch_size=4)
    inputs, labels = stack_inputs(build_loader(spec, "data.eval"))
    assert inputs.shape == (6, 3, 8, 8)
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]


def test_imagefolder_grayscale_and_crop(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "imgs")
    spec = ImageFolderData(source="imagefolder", root=str(root), grayscale=True, crop=6)
    assert tuple(build_dataset(spec)[0][0].shape) == (1, 6, 6)


def test_imagefolder_missing_and_empty(tmp_path: Path) -> None:
    missing = tmp_path / "none"
    spec = ImageFolderData(source="imagefolder", root=str(missing))
    assert one_line_error(DataError, build_dataset, spec, "data.eval") == f"data.eval: image folder {missing} not found"
    (tmp_path / "empty").mkdir()
    spec = ImageFolderData(source="imagefolder", root=str(tmp_path / "empty"))
    assert "has no class sub-folders" in one_line_error(DataError, build_dataset, spec, "data.eval")


def test_imagefolder_corrupt_image_names_the_file(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "imgs")
    broken = root / "dog" / "1.png"
    broken.write_bytes(b"\x89PNG but not really")
    spec = ImageFolderData(source="imagefolder", root=str(root), batch_size=2)
    message = one_line_error(DataError, iterate, build_loader(spec, "data.train"))
    assert message.startswith(f"data.train: sample 4 ({broken}) cannot be loaded: UnidentifiedImageError")


# --------------------------------------------------------------------------------------------
# --data shorthand (compress check)


def test_parse_data_arg_valid_forms() -> None:
    assert parse_data_arg("digits").split == "test"
    assert parse_data_arg("digits:train", batch_size=8).batch_size == 8
    assert parse_data_arg("npz:some/file.npz").path == "some/file.npz"
    assert parse_data_arg("imagefolder:/data/val").root == "/data/val"
    assert parse_data_arg("python:helpers_data:digits_like").factory == "helpers_data:digits_like"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mnist", "--data mnist: expected digits[:SPLIT], npz:FILE, imagefolder:DIR or python:MODULE:FN"),
        ("npz:", "--data npz:: expected digits[:SPLIT]"),
        ("digits:tset", "--data digits:tset: split: unknown 'tset'; did you mean 'test'? (train, test, all)"),
        ("python:nocolon", "--data python:nocolon: factory: 'nocolon' is not of the form 'module:callable'"),
    ],
)
def test_parse_data_arg_errors(text: str, expected: str) -> None:
    assert one_line_error(DataError, parse_data_arg, text).startswith(expected)


def test_parse_data_arg_options_are_spec_fields_or_factory_kwargs() -> None:
    spec = parse_data_arg("digits:test?size=32&channels=3&limit=10")
    assert (spec.split, spec.size, spec.channels, spec.limit) == ("test", 32, 3, 10)
    assert parse_data_arg("digits?split=train").split == "train"
    assert parse_data_arg("npz:a.npz?y=").y is None  # an empty value is null: unlabeled
    # plain values, not YAML 1.1's: 010 is no octal 8 and a split named `no` is no boolean
    assert parse_data_arg("python:helpers_splits:digits?split=no&size=010").kwargs == {"split": "no", "size": "010"}
    spec = parse_data_arg("python:helpers_data:digits_like?n=20&size=12")
    assert spec.kwargs == {"n": 20, "size": 12}  # ints stay ints
    spec = parse_data_arg("python:helpers_data:digits_like?n=20", kwargs='{"size": 12}')
    assert spec.kwargs == {"n": 20, "size": 12}
    assert parse_data_arg("python:helpers_splits:digits", kwargs="{split: test}").kwargs == {"split": "test"}


def test_describe_spec_names_every_option_in_effect() -> None:
    assert describe_spec(parse_data_arg("digits:test")) == "digits:test"
    assert describe_spec(parse_data_arg("digits:test?size=32&limit=10")) == "digits:test?size=32&limit=10"
    # a factory's defaults are what ran: they are named, so a default train split cannot hide
    assert describe_spec(parse_data_arg("python:helpers_splits:digits")) == "python:helpers_splits:digits?split=train&size=8"
    assert describe_spec(parse_data_arg("python:helpers_splits:digits?split=test")) == (
        "python:helpers_splits:digits?split=test&size=8")


@pytest.mark.parametrize(
    ("text", "kwargs", "expected"),
    [
        ("python:helpers_data:digits_like?n", None, "--data python:helpers_data:digits_like?n: option 'n' is not key=value"),
        ("python:helpers_data:digits_like?=3", None, "--data python:helpers_data:digits_like?=3: option '=3' is not key=value"),
        ("python:helpers_data:digits_like?n=1&n=2", None, "--data python:helpers_data:digits_like?n=1&n=2: option 'n' given twice"),
        ("python:helpers_data:digits_like", "{n: 3", "--data python:helpers_data:digits_like: --data-kwargs '{n: 3' does not parse"),
        ("python:helpers_data:digits_like", "[1]", "--data python:helpers_data:digits_like: --data-kwargs '[1]' is not a mapping"),
        ("python:helpers_data:digits_like?n=3", '{"n": 4}',
         "--data python:helpers_data:digits_like?n=3: option 'n' given both after '?' and in --data-kwargs"),
        ("python:helpers_data:digits_like?sise=3", None, "--data python:helpers_data:digits_like?sise=3: "
         "helpers_data:digits_like takes no argument 'sise'; did you mean 'size'? (takes n, size)"),
        ("digits:test?sise=32", None, "--data digits:test?sise=32: sise: unknown key 'sise'; did you mean 'size'?"),
        ("digits:test?split=train", None, "--data digits:test?split=train: option 'split' given both after ':' and as an option"),
        ("digits:test?size=7", None, "--data digits:test?size=7: size: Input should be greater than or equal to 8 (got 7)"),
    ],
)
def test_parse_data_arg_option_errors(text: str, kwargs: str | None, expected: str) -> None:
    assert one_line_error(DataError, parse_data_arg, text, kwargs=kwargs).startswith(expected)


def test_recipe_python_factory_refuses_a_keyword_it_does_not_take() -> None:
    spec = PythonData(source="python", factory="helpers_data:digits_like", kwargs={"splt": "test"})
    assert one_line_error(DataError, build_dataset, spec, "data.eval") == (
        "data.eval: helpers_data:digits_like takes no argument 'splt' (takes n, size)")


def test_every_data_source_has_a_builder_and_a_shorthand() -> None:
    from compress.data import BUILDERS
    from compress.data_config import SOURCE_NAMES, SOURCES, source_name

    assert SOURCE_NAMES == ("digits", "npz", "imagefolder", "python")
    assert set(BUILDERS) == set(SOURCES)
    for cls in SOURCES:
        assert cls.SHORTHAND.startswith(f"{source_name(cls)}") and cls.MAIN_OPTION in cls.model_fields
