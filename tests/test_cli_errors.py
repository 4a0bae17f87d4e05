"""`compress run` / `compress validate` on bad input: exit code 2, one stderr line naming what and where."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.models import build

LR_LINE = 10  # line of "finetune: {epochs: 1, lr: 0.05}" in TINY_RECIPE


def _with_eval(text: str, eval_spec: str) -> str:
    return text.replace("  eval: {source: digits, split: test}", f"  eval: {eval_spec}")


def _with_checkpoint(text: str, path: Path) -> str:
    return text.replace("  kwargs: {hidden: 8}", f"  kwargs: {{hidden: 8}}\n  checkpoint: {path}")


def test_unknown_key(cli, write_recipe, tiny_recipe_text, tmp_path) -> None:
    recipe = write_recipe(tiny_recipe_text.replace("lr: 0.05", "lrr: 0.05"))
    message = cli("run", recipe, "--out", tmp_path / "out", "--quiet").error_line()
    assert message.startswith(f"{recipe}:{LR_LINE} stages.0.train.finetune.lrr: unknown key 'lrr'; did you mean 'lr'?")
    assert not (tmp_path / "out").exists()  # nothing is written for a recipe that does not validate


def test_wrong_type(cli, write_recipe, tiny_recipe_text, tmp_path) -> None:
    recipe = write_recipe(tiny_recipe_text.replace("epochs: 1", "epochs: three"))
    message = cli("run", recipe, "--out", tmp_path / "out", "--quiet").error_line()
    assert message.startswith(f"{recipe}:{LR_LINE} stages.0.train.finetune.epochs:")
    assert "'three'" in message


def test_bad_set_override(cli, write_recipe, tiny_recipe_text, tmp_path) -> None:
    recipe = write_recipe(tiny_recipe_text)
    result = cli("run", recipe, "--out", tmp_path / "out", "--quiet", "--set", "stages.0.train.finetune.lr=fast")
    message = result.error_line()
    assert message.startswith("--set stages.0.train.finetune.lr:") and "'fast'" in message


def test_missing_recipe_file(cli, tmp_path) -> None:
    recipe = tmp_path / "nope.yaml"
    assert cli("run", recipe, "--quiet").error_line() == f"{recipe}: recipe file not found"


def test_missing_checkpoint_file(cli, write_recipe, tiny_recipe_text, tmp_path) -> None:
    ckpt = tmp_path / "missing.pt"
    recipe = write_recipe(_with_checkpoint(tiny_recipe_text, ckpt))
    message = cli("run", recipe, "--out", tmp_path / "out", "--quiet").error_line()
    assert message == f"{recipe}:5 model.checkpoint: checkpoint {ckpt}: file not found"  # the recipe line that led there


def test_pickled_module_checkpoint(cli, write_recipe, tiny_recipe_text, tmp_path) -> None:
    ckpt = tmp_path / "pickled.pt"
    torch.save(build("compress.zoo:digits_mlp", {"hidden": 8}), ckpt)
    recipe = write_recipe(_with_checkpoint(tiny_recipe_text, ckpt))
    message = cli("run", recipe, "--out", tmp_path / "out", "--quiet").error_line()
    assert message.startswith(f"{recipe}:5 model.checkpoint: checkpoint {ckpt}: holds pickled Python objects")
    assert "state_dict" in message


def test_truncated_checkpoint(cli, write_recipe, tiny_recipe_text, mlp_checkpoint, tmp_path) -> None:
    data = mlp_checkpoint.read_bytes()
    mlp_checkpoint.write_bytes(data[: len(data) // 3])
    recipe = write_recipe(_with_checkpoint(tiny_recipe_text, mlp_checkpoint))
    message = cli("validate", recipe, "--quiet").error_line()
    assert message.startswith(f"{recipe}:5 model.checkpoint: checkpoint {mlp_checkpoint}: not a readable torch checkpoint")


def test_empty_eval_dataset(cli, write_recipe, tiny_recipe_text, tmp_path) -> None:
    npz = tmp_path / "empty.npz"
    np.savez(npz, x=np.zeros((0, 1, 8, 8), np.float32), y=np.zeros(0, np.int64))
    recipe = write_recipe(_with_eval(tiny_recipe_text, f"{{source: npz, path: {npz}}}"))
    message = cli("run", recipe, "--out", tmp_path / "out", "--quiet").error_line()
    assert message == f"{recipe}:7 data.eval: dataset is empty (npz {npz})"


def test_nan_in_npz_data(cli, write_recipe, tiny_recipe_text, tmp_path) -> None:
    npz = tmp_path / "nan.npz"
    x = np.zeros((20, 1, 8, 8), np.float32)
    x[13, 0, 4, 4] = np.nan
    np.savez(npz, x=x, y=np.arange(20) % 10)
    recipe = write_recipe(_with_eval(tiny_recipe_text, f"{{source: npz, path: {npz}}}"))
    message = cli("run", recipe, "--out", tmp_path / "out", "--quiet").error_line()
    assert message == f"{recipe}:7 data.eval: {npz} array 'x' has 1 NaN/Inf values (first in sample 13)"


def test_nan_from_a_python_factory(cli, write_recipe, tiny_recipe_text, tmp_path) -> None:
    spec = "{source: python, factory: 'helpers_data:nan_at', kwargs: {n: 12, bad: 9}}"
    recipe = write_recipe(_with_eval(tiny_recipe_text, spec))
    message = cli("validate", recipe, "--quiet").error_line()
    assert message == f"{recipe}:7 data.eval: sample 9 contains NaN or Inf inputs"


def test_model_and_data_shape_mismatch(cli, write_recipe, tiny_recipe_text, tmp_path) -> None:
    text = _with_eval(tiny_recipe_text, "{source: digits, split: test, size: 16}")
    recipe = write_recipe(text.replace("limit: 128}", "limit: 128, size: 16}"))
    message = cli("run", recipe, "--out", tmp_path / "out", "--quiet").error_line()
    assert message.startswith(
        f"{recipe}:7 data.eval: model compress.zoo:digits_mlp cannot run on inputs of shape [64, 1, 16, 16]: "
    )
    assert "256" in message and "64" in message  # 16*16 features offered, 64 expected


def test_bad_model_kwargs(cli, write_recipe, tiny_recipe_text) -> None:
    recipe = write_recipe(tiny_recipe_text.replace("{hidden: 8}", "{hidden: 8, depth: 2}"))
    message = cli("validate", recipe, "--quiet").error_line()
    assert message.startswith(f"{recipe}:3 model.factory: model factory 'compress.zoo:digits_mlp' failed with kwargs "
                              "{'hidden': 8, 'depth': 2}")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run"], "the following arguments are required: recipe (see 'compress run --help')"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["validate", "r.yaml", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_are_one_line_exit_2(cli, args, expected) -> None:
    assert expected in cli(*args).error_line()


def test_out_that_is_a_file(cli, write_recipe, tiny_recipe_text, tmp_path) -> None:
    recipe = write_recipe(tiny_recipe_text)
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    message = cli("run", recipe, "--out", blocker, "--quiet").error_line()
    assert str(blocker) in message
    assert blocker.read_text() == "keep me"


def test_validate_good_recipe_prints_the_plan_and_trains_nothing(cli, write_recipe, tiny_recipe_text, tmp_path,
                                                                 monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tiny_recipe_text)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli("validate", recipe, "--quiet")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0] == f"recipe  tiny ({recipe})"
    assert lines[1].startswith("model   compress.zoo:digits_mlp {'hidden': 8}") and "610 params" in lines[1]
    assert "data    train: digits, 128 samples, batch 64" in lines
    assert "data    eval: digits, 360 samples, batch 64" in lines
    stage = next(ln for ln in lines if ln.startswith("stage 1 train "))
    finetune = json.loads(stage.removeprefix("stage 1 train "))["finetune"]
    assert (finetune["epochs"], finetune["lr"], finetune["optimizer"]) == (1, 0.05, "sgd")  # resolved options
    assert lines[-1] == "valid"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run directory, no files


def test_validate_bad_recipe(cli, write_recipe, tiny_recipe_text) -> None:
    recipe = write_recipe(tiny_recipe_text.replace("- train:", "- trian:"))
    message = cli("validate", recipe).error_line()
    assert message.startswith(f"{recipe}:9 stages.0: unknown stage type 'trian'; did you mean 'train'?")


# --------------------------------------------------------------------------------------------
# An existing run directory is never damaged by a refused or failed run


def test_existing_run_is_refused_and_untouched(cli, finished_run, snapshot_tree) -> None:
    before = snapshot_tree(finished_run.run_dir)
    assert {"recipe.yaml", "model.pt", "report.json", "stages/01-train/checkpoint.pt"} <= set(before)
    message = cli("run", finished_run.recipe, "--out", finished_run.run_dir, "--quiet").error_line()
    assert message == (
        f"{finished_run.run_dir} already holds a run; use --resume to continue it, --overwrite to replace it, "
        "or another --out"
    )
    assert snapshot_tree(finished_run.run_dir) == before


def test_bad_recipe_into_an_existing_run_leaves_it_untouched(cli, finished_run, snapshot_tree, write_recipe,
                                                             tiny_recipe_text) -> None:
    before = snapshot_tree(finished_run.run_dir)
    recipe = write_recipe(tiny_recipe_text.replace("epochs: 1", "epochs: -1"))
    for flags in ([], ["--resume"], ["--overwrite"]):
        cli("run", recipe, "--out", finished_run.run_dir, "--quiet", *flags).error_line()
        assert snapshot_tree(finished_run.run_dir) == before


def test_overwrite_with_bad_checkpoint_keeps_the_old_run(cli, finished_run, snapshot_tree, write_recipe,
                                                         tiny_recipe_text, tmp_path) -> None:
    before = snapshot_tree(finished_run.run_dir)
    recipe = write_recipe(_with_checkpoint(tiny_recipe_text, tmp_path / "missing.pt"))
    cli("run", recipe, "--out", finished_run.run_dir, "--quiet", "--overwrite").error_line()
    assert snapshot_tree(finished_run.run_dir) == before


def test_failed_input_does_not_block_the_next_attempt(cli, write_recipe, tiny_recipe_text, tmp_path) -> None:
    out = tmp_path / "out"
    bad = write_recipe(_with_checkpoint(tiny_recipe_text, tmp_path / "missing.pt"), "bad.yaml")
    cli("run", bad, "--out", out, "--quiet").error_line()
    assert not (out / "recipe.yaml").exists()
    good = write_recipe(tiny_recipe_text, "good.yaml")
    assert cli("run", good, "--out", out, "--quiet").code == 0


def test_train_split_shape_mismatch_is_bad_input(cli, write_recipe, tiny_recipe_text, tmp_path) -> None:
    text = tiny_recipe_text.replace("split: train, limit: 128}", "split: train, limit: 128, size: 16}")
    recipe = write_recipe(text)
    message = cli("run", recipe, "--out", tmp_path / "out", "--quiet").error_line()
    assert message == f"{recipe}:6 data.train: inputs have shape [1, 16, 16] but data.eval has [1, 8, 8]"
    assert not (tmp_path / "out").exists()
