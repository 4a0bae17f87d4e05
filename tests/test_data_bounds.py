"""Data that would hang or crash a run (issue 16): one line naming the split, found by validate.

Image folders are walked without following links below a class folder, class folders that link
back to the root are skipped, and the walk is capped; a dataset's ``__len__`` and a classification
split's labels are checked when the split is built.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from compress.data import build_dataset
from compress.errors import DataError
from compress.imagefolder import _samples
from compress.recipe import ImageFolderData

PY_TRAIN = "data.train={source: python, factory: 'helpers_data:%s'%s}"


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, dtype=np.uint8)).save(path)


def test_imagefolder_at_proc_self_is_one_line_not_a_hang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # /proc/self/cwd is a class folder: keep it small
    spec = ImageFolderData(source="imagefolder", root="/proc/self")
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        build_dataset(spec, "data.eval")
    # torchvision followed /proc/self/root back to / forever; a few seconds on a loaded 2-core machine
    assert time.perf_counter() - start < 30
    message = str(info.value)
    assert message.startswith("data.eval: image folder /proc/self: no image files") and "\n" not in message
    assert " root" not in message.split("class folder(s)")[1]  # the link back to / was not taken as a class


def test_imagefolder_links_are_not_followed_into_loops(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    _png(root / "cat" / "a.png", 10)
    _png(root / "dog" / "b.png", 200)
    (root / "cat" / "loop").symlink_to(root)  # below a class folder: not entered
    (root / "up").symlink_to(tmp_path)  # a class folder that leads back above the root: skipped
    (root / "self").symlink_to(root)
    dataset = build_dataset(ImageFolderData(source="imagefolder", root=str(root)), "data.eval")
    assert dataset.classes == ["cat", "dog"]  # type: ignore[attr-defined]
    assert [Path(p).name for p, _ in dataset.samples] == ["a.png", "b.png"]  # type: ignore[attr-defined]


def test_imagefolder_walk_is_capped(tmp_path: Path) -> None:
    for i in range(12):
        (tmp_path / "cls" / f"{i}.png").parent.mkdir(exist_ok=True)
        (tmp_path / "cls" / f"{i}.png").touch()
    assert len(_samples(tmp_path, ["cls"], lambda p: p.endswith(".png"), limit=12)) == 12
    with pytest.raises(DataError, match="more than 10 files and folders under it"):
        _samples(tmp_path, ["cls"], lambda p: p.endswith(".png"), limit=10)


@pytest.mark.parametrize(("length", "expected"), [
    ("-1", "the dataset's __len__ is unusable: ValueError: __len__() should return >= 0"),
    ("1.5", "the dataset's __len__ is unusable: TypeError: 'float' object cannot be interpreted as an integer"),
    ("'ten'", "the dataset's __len__ is unusable: TypeError: 'str' object cannot be interpreted as an integer"),
    ("1180591620717411303424", "the dataset's __len__ is unusable: OverflowError: cannot fit 'int'"),
])
def test_dataset_len_that_is_not_a_count(cli, write_recipe, tiny_recipe_text, length, expected) -> None:
    recipe = write_recipe(tiny_recipe_text)
    line = cli("validate", recipe, "--quiet", "--set", PY_TRAIN % ("sized", f", kwargs: {{length: {length}}}")).error_line()
    assert line.startswith(f"{recipe}:6 data.train: {expected}")


def test_float_labels_in_the_train_split(cli, write_recipe, tiny_recipe_text) -> None:
    recipe = write_recipe(tiny_recipe_text)
    line = cli("validate", recipe, "--quiet", "--set", PY_TRAIN % ("float_labels", "")).error_line()
    assert line == (f"{recipe}:6 data.train: labels are torch.float32 numbers; a classification split needs integer "
                    "class labels (0..classes-1)")


def test_float_labels_in_eval_only_matter_to_top1(cli, write_recipe, tiny_recipe_text) -> None:
    recipe = write_recipe(tiny_recipe_text.replace("eval: {source: digits, split: test}",
                                                   "eval: {source: python, factory: 'helpers_data:float_labels'}"))
    assert cli("validate", recipe, "--quiet").error_line().startswith(f"{recipe}:7 data.eval: labels are torch.float32")
    result = cli("validate", recipe, "--quiet", "--set", "metric=agreement")
    assert result.code == 0, result.err


def test_validate_refuses_a_fine_tune_without_labels(cli, write_recipe, tiny_recipe_text) -> None:
    """`run` failed in the middle of the train stage; validate passed."""
    recipe = write_recipe(tiny_recipe_text)
    unlabeled = PY_TRAIN % ("unlabeled", "")
    line = cli("validate", recipe, "--quiet", "--set", unlabeled).error_line()
    assert line == (f"{recipe}:9 stages.0.train.finetune: the task loss needs labels, but data.train has none; "
                    "add labels, or fine-tune with distill: {label_free: true}")
    label_free = "stages.0.train.finetune.distill={label_free: true}"
    result = cli("validate", recipe, "--quiet", "--set", unlabeled, "--set", label_free)
    assert result.code == 0, result.err


def test_library_warnings_do_not_break_the_one_line_error(cli, write_recipe, tiny_recipe_text, monkeypatch) -> None:
    """Found by the recipe fuzz: a zero-width layer made torch warn on stderr before the one-line error."""

    def to_stderr(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001 - as Python's
        print(warnings.formatwarning(message, category, filename, lineno, line), file=sys.stderr, end="")

    warnings.simplefilter("always")  # pytest restores its filters after the test
    monkeypatch.setattr(warnings, "showwarning", to_stderr)  # as outside pytest: warnings go to stderr
    recipe = write_recipe(tiny_recipe_text)
    zero = "model.kwargs={hidden: 0}"  # torch: "Initializing zero-element tensors is a no-op"
    line = cli("validate", recipe, "--quiet", "--set", zero, "--set", PY_TRAIN % ("float_labels", "")).error_line()
    assert "labels are torch.float32 numbers" in line
    result = cli("validate", recipe, "--quiet", "--set", zero)  # good input: the warnings are still shown
    assert result.code == 0 and "zero-element tensors" in result.err
