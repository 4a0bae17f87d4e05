"""``data.val``: the holdout of train (sizes, disjointness, determinism, stratification), keep_best
selecting on it and never on data.eval, keep_best off (with the reason) without it, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_errors import one_line_error

import compress
from compress.data import build_dataset, build_loader
from compress.errors import DataError
from compress.holdout import cheap_labels, holdout_indices
from compress.recipe import DataSection, DigitsData, Holdout
from compress.stages.context import Splits

TRAIN = DigitsData(source="digits", split="train", batch_size=64)


def _digits_labels() -> np.ndarray:
    labels = cheap_labels(build_dataset(TRAIN))
    assert labels is not None and len(labels) == 1437
    return labels


def test_holdout_sizes_disjoint_and_covering() -> None:
    kept, held = holdout_indices(1437, 0.1, seed=0, labels=_digits_labels())
    assert len(held) == 144 and len(kept) == 1293  # round(143.7)
    assert not set(kept) & set(held) and sorted(kept + held) == list(range(1437))


def test_holdout_is_stratified_by_label() -> None:
    labels = _digits_labels()
    _, held = holdout_indices(1437, 0.1, seed=0, labels=labels)
    counts, share = np.bincount(labels, minlength=10), np.bincount(labels[held], minlength=10)
    # largest remainders: each class gives floor or ceil of its exact share, never a sample more or less
    ideal = counts * 144 / 1437
    assert np.all((share == np.floor(ideal)) | (share == np.ceil(ideal)))


def test_holdout_is_deterministic_under_the_seed() -> None:
    labels = _digits_labels()
    assert holdout_indices(1437, 0.1, 0, labels) == holdout_indices(1437, 0.1, 0, labels)
    assert holdout_indices(1437, 0.1, 0, labels)[1] != holdout_indices(1437, 0.1, 1, labels)[1]
    # without labels: a seeded permutation, the same size
    kept, held = holdout_indices(50, 0.2, 3)
    assert (kept, held) == holdout_indices(50, 0.2, 3) and len(held) == 10 and len(kept) == 40


def test_holdout_keeps_one_sample_on_each_side() -> None:
    assert [len(p) for p in holdout_indices(3, 0.01, 0)] == [2, 1]
    assert [len(p) for p in holdout_indices(3, 0.99, 0)] == [1, 2]
    assert one_line_error(DataError, holdout_indices, 1, 0.5, 0) == "holdout 0.5 needs at least 2 samples in data.train, found 1"


def test_splits_remove_the_holdout_from_train() -> None:
    section = DataSection(train=TRAIN, val=Holdout(holdout=0.1), eval=DigitsData(source="digits", split="test"))
    splits = Splits(section, seed=0)
    train, val = splits.loader("train"), splits.loader("val")
    kept, held = train.dataset.dataset.indices, val.dataset.dataset.indices  # _CheckedDataset(Subset(train))
    assert len(kept) == 1293 and len(held) == 144 and not set(kept) & set(held)
    assert (kept, held) == holdout_indices(1437, 0.1, 0, _digits_labels())
    assert val.batch_size == 64 and not isinstance(val.sampler, torch.utils.data.RandomSampler)  # val: in order
    assert splits.origin("val") == "holdout 0.1 of data.train (seed 0)"
    other = Splits(section, seed=1)
    assert other.loader("val").dataset.dataset.indices != held  # the recipe seed draws the holdout


def test_holdout_of_a_tiny_train_split_names_data_val() -> None:
    section = DataSection(train=TRAIN.model_copy(update={"limit": 1}), val=Holdout(holdout=0.5),
                          eval=DigitsData(source="digits", split="test"))
    message = one_line_error(DataError, Splits(section).loader, "val")
    assert message == "data.val: holdout 0.5 needs at least 2 samples in data.train, found 1"


# --------------------------------------------------------------------------------------------
# the recipe: keep_best on data.val, eval reported only

RECIPE = """\
name: v
model:
  factory: compress.zoo:digits_mlp
  kwargs: {{hidden: 8}}
data:
  train: {{source: digits, split: train, limit: 200}}
{val}  eval: {{source: digits, split: test}}
stages:
  - train:
      finetune: {{epochs: 4, lr: 0.2, seed: 0}}
{more}"""


def _top1(model: torch.nn.Module, loader) -> float:
    return compress.metrics.score("top1", compress.metrics.collect(model, loader))["top1"]


def test_keep_best_selects_on_val_and_the_stage_reports_eval(write_recipe, cli, tmp_path: Path) -> None:
    recipe = write_recipe(RECIPE.format(val="  val: {holdout: 0.25}\n", more=""))
    assert cli("run", recipe, "--out", tmp_path / "run", "--quiet").code == 0
    entry = json.loads((tmp_path / "run" / "report.json").read_text())["stages"][0]
    finetune = entry["finetune"]
    assert finetune["keep_best"] == "on: best epoch on data.val"
    scores = [h["val_top1"] for h in finetune["history"]]
    assert len(scores) == 4 and all(abs(s * 50 - round(s * 50)) < 1e-6 for s in scores)  # 50 held-out samples
    assert finetune["best_epoch"] == len(scores) - int(np.argmax(scores[::-1]))  # the last of equal scores
    model = compress.load(tmp_path / "run" / entry["checkpoint"])
    splits = Splits(DataSection(train=TRAIN.model_copy(update={"limit": 200}), val=Holdout(holdout=0.25),
                                eval=DigitsData(source="digits", split="test")), seed=0)
    # the restored epoch is the one data.val scored best: the saved model scores it again, exactly
    assert _top1(model, splits.loader("val")) == max(scores)
    # and the figure the stage reports is on data.eval (360 samples), not on val
    assert entry["metrics"]["top1"] == _top1(model, build_loader(DigitsData(source="digits", split="test"), "eval"))


def test_val_as_a_split_of_its_own(write_recipe, cli, tmp_path: Path) -> None:
    val = "  val: {source: digits, split: test, limit: 40}\n"
    recipe = write_recipe(RECIPE.format(val=val, more=""))
    result = cli("validate", recipe)
    assert result.code == 0
    assert "data    train: digits, 200 samples, batch 64" in result.out
    assert "data    val: digits, 40 samples, batch 64 (selects: keep_best)" in result.out
    assert cli("run", recipe, "--out", tmp_path / "run", "--quiet").code == 0
    history = json.loads((tmp_path / "run" / "report.json").read_text())["stages"][0]["finetune"]["history"]
    assert all(abs(h["val_top1"] * 40 - round(h["val_top1"] * 40)) < 1e-6 for h in history)


def test_without_val_keep_best_is_off_and_says_why_once(write_recipe, cli, tmp_path: Path) -> None:
    more = "  - train:\n      finetune: {epochs: 1, lr: 0.05}\n"
    recipe = write_recipe(RECIPE.format(val="", more=more))
    result = cli("run", recipe, "--out", tmp_path / "run")
    assert result.code == 0
    assert result.err.count("keep_best off: no data.val split") == 1  # once, for both stages
    assert "stages 01-train, 02-train keep their last epoch" in result.err
    for entry in json.loads((tmp_path / "run" / "report.json").read_text())["stages"]:
        finetune = entry["finetune"]
        assert finetune["keep_best"] == "off: no data.val split" and finetune["best_epoch"] is None
        assert all("val_top1" not in h for h in finetune["history"])  # nothing was scored to select on
    assert "keep_best off: no data.val split" in cli("validate", recipe).out


@pytest.mark.parametrize(
    ("val", "expected"),
    [
        ("{holdout: 1.5}", "recipe.yaml:7 data.val.holdout: Input should be less than 1 (got 1.5)"),
        ("{holdout: 0}", "recipe.yaml:7 data.val.holdout: Input should be greater than 0 (got 0)"),
        ("{source: digits, split: train, size: 16}",
         "recipe.yaml:7 data.val: inputs have shape [1, 16, 16] but data.eval has [1, 8, 8]"),
    ],
)
def test_bad_val_exits_2_with_one_line(write_recipe, cli, val: str, expected: str) -> None:
    recipe = write_recipe(RECIPE.format(val=f"  val: {val}\n", more=""))
    assert cli("validate", recipe).error_line() == expected.replace("recipe.yaml", str(recipe))


def test_holdout_without_train_and_unlabeled_val(write_recipe, cli, tmp_path: Path) -> None:
    text = RECIPE.format(val="  val: {holdout: 0.1}\n", more="").replace(
        "  train: {source: digits, split: train, limit: 200}\n", "")
    recipe = write_recipe(text.replace("stages:\n  - train:\n      finetune: {epochs: 4, lr: 0.2, seed: 0}\n", "stages: []\n"))
    assert cli("validate", recipe).error_line() == (
        f"{recipe}:6 data.val: holdout takes a part of data.train, which the recipe does not define")
    npz = tmp_path / "x.npz"
    np.savez(npz, x=np.zeros((6, 1, 8, 8), np.float32))
    recipe = write_recipe(RECIPE.format(val=f"  val: {{source: npz, path: {npz}, y: null}}\n", more=""))
    assert cli("validate", recipe).error_line() == (
        f"{recipe}:7 data.val: metric top1 selects on labels, but data.val has none")
