"""Recipe schema errors: each names the file, the YAML line, the dotted field and the value, on one line."""

from __future__ import annotations

import pytest
import yaml

from compress.errors import RecipeError
from compress.recipe import load_recipe, parse_recipe

BASE = """\
name: t
model:
  factory: compress.zoo:digits_mlp
  kwargs: {hidden: 8}
data:
  train: {source: digits, split: train}
  eval: {source: digits, split: test}
stages:
  - train:
      finetune:
        epochs: 1
        lr: 0.01
"""
# line numbers in BASE: 3 factory, 6 train, 7 eval, 9 train stage, 11 epochs, 12 lr


def error_of(text: str, overrides: tuple[str, ...] = (), source: str = "recipe.yaml") -> str:
    """The RecipeError message for ``text``; asserts it is a single line."""
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, source=source, overrides=overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_base_recipe_is_valid() -> None:
    recipe = parse_recipe(BASE, source="recipe.yaml")
    assert recipe.name == "t"
    assert [s.type for s in recipe.stages] == ["train"]
    assert recipe.stages[0].config.finetune.epochs == 1


def test_unknown_top_level_key_suggests_the_right_one() -> None:
    message = error_of(BASE + "stagse: []\n")
    assert message.startswith("recipe.yaml:13 stagse: unknown key 'stagse'")
    assert "did you mean 'stages'?" in message


def test_unknown_nested_key_names_the_dotted_field_and_line() -> None:
    message = error_of(BASE.replace("        lr: 0.01", "        learning_rate: 0.01"))
    assert message.startswith("recipe.yaml:12 stages.0.train.finetune.learning_rate: unknown key 'learning_rate'")
    assert "allowed: epochs, lr," in message


def test_unknown_nested_key_close_to_a_real_one_gets_a_suggestion() -> None:
    message = error_of(BASE.replace("{source: digits, split: train}", "{source: digits, split: train, batchsize: 8}"))
    assert message.startswith("recipe.yaml:6 data.train.batchsize: unknown key 'batchsize'")
    assert "did you mean 'batch_size'?" in message


def test_wrong_type_names_field_line_and_value() -> None:
    message = error_of(BASE.replace("epochs: 1", 'epochs: "three"'))
    assert message.startswith("recipe.yaml:11 stages.0.train.finetune.epochs:")
    assert "valid integer" in message
    assert "'three'" in message


def test_boolean_for_a_count_is_refused() -> None:
    message = error_of(BASE.replace("epochs: 1", "epochs: yes"))
    assert message == "recipe.yaml:11 stages.0.train.finetune.epochs: expected a number, got true"


def test_out_of_range_value_reports_the_value() -> None:
    message = error_of(BASE.replace("lr: 0.01", "lr: -1"))
    assert message.startswith("recipe.yaml:12 stages.0.train.finetune.lr: Input should be greater than 0")
    assert "(got -1)" in message


def test_unknown_stage_type_suggests_registered_types() -> None:
    message = error_of(BASE.replace("  - train:", "  - trian:"))
    assert message.startswith("recipe.yaml:9 stages.0: unknown stage type 'trian'; did you mean 'train'?")
    assert "export" in message and "train" in message


def test_stage_entry_with_two_types_is_refused() -> None:
    text = BASE.split("stages:")[0] + "stages:\n  - {train: {}, export: {}}\n"
    message = error_of(text)
    assert message.startswith("recipe.yaml:9 stages.0: each stage is a mapping with one key")


def test_unknown_enum_value_suggests_the_closest() -> None:
    message = error_of(BASE.replace("lr: 0.01", "optimizer: sgdd"))
    assert message.startswith("recipe.yaml:12 stages.0.train.finetune.optimizer: unknown 'sgdd'; did you mean 'sgd'?")
    assert "(sgd, adamw)" in message


def test_unknown_data_source_suggests_a_known_one() -> None:
    message = error_of(BASE.replace("{source: digits, split: test}", "{source: digitz, split: test}"))
    assert message.startswith("recipe.yaml:7 data.eval: unknown source 'digitz'; did you mean 'digits'?")
    assert "npz" in message and "imagefolder" in message and "python" in message


def test_unknown_split_of_a_known_source() -> None:
    message = error_of(BASE.replace("split: test", "split: tset"))
    assert message.startswith("recipe.yaml:7 data.eval.split: unknown 'tset'; did you mean 'test'?")


def test_missing_required_eval_split() -> None:
    message = error_of(BASE.replace("  eval: {source: digits, split: test}\n", ""))
    assert message == "recipe.yaml:5 data.eval: missing required field"


def test_missing_required_field_of_a_source() -> None:
    message = error_of(BASE.replace("{source: digits, split: test}", "{source: npz}"))
    assert message == "recipe.yaml:7 data.eval.path: missing required field"


def test_model_needs_factory_or_checkpoint() -> None:
    message = error_of(BASE.replace("  factory: compress.zoo:digits_mlp\n", ""))
    assert message.startswith("recipe.yaml:2 model:")
    assert "factory" in message and "checkpoint" in message


@pytest.mark.parametrize("ref", ["compress.zoo.digits_mlp", "compress.zoo:digits mlp", ":digits_mlp"])
def test_bad_module_callable_string(ref: str) -> None:
    message = error_of(BASE.replace("compress.zoo:digits_mlp", f"'{ref}'"))
    assert message.startswith("recipe.yaml:3 model.factory:")
    assert f"'{ref}' is not of the form 'module:callable'" in message


def test_invalid_yaml_reports_the_line() -> None:
    message = error_of(BASE.replace("        epochs: 1", "        epochs: 1: 2"))
    assert message.startswith("recipe.yaml:11: invalid YAML:")
    assert "mapping values are not allowed" in message


def test_unclosed_quote_points_back_to_where_it_opened() -> None:
    message = error_of(BASE.replace("name: t", "name: 't"))
    assert message.startswith("recipe.yaml:")
    assert "invalid YAML" in message and "quoted scalar at line 1" in message


def test_duplicate_key_names_the_second_occurrence() -> None:
    text = BASE.replace("        lr: 0.01", "        lr: 0.01\n        epochs: 2")
    assert error_of(text) == "recipe.yaml:13 stages.0.train.finetune.epochs: duplicate key 'epochs'"


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_recipe_that_is_not_a_mapping(text: str) -> None:
    assert error_of(text).startswith("recipe.yaml:1: a recipe must be a mapping")


def test_unknown_metric_and_device() -> None:
    assert error_of(BASE + "metric: top5\n").startswith("recipe.yaml:13 metric: unknown metric 'top5'")
    assert error_of(BASE + "device: tpu\n").startswith("recipe.yaml:13 device: unknown device 'tpu'")


def test_first_of_several_problems_is_reported_with_a_count() -> None:
    text = BASE.replace("epochs: 1", "epochs: x").replace("lr: 0.01", "lr: y")
    message = error_of(text)
    assert message.startswith("recipe.yaml:11 stages.0.train.finetune.epochs:")
    assert message.endswith("(and 1 more problem)")


# --------------------------------------------------------------------------------------------
# load_recipe and --set overrides


def test_load_recipe_prefixes_the_real_file_name(tmp_path) -> None:
    path = tmp_path / "my-recipe.yaml"
    path.write_text(BASE.replace("epochs: 1", "epochs: three"))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}:11 stages.0.train.finetune.epochs:")


def test_load_recipe_missing_file(tmp_path) -> None:
    with pytest.raises(RecipeError, match=r"nope\.yaml: recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_valid_override_changes_the_value() -> None:
    recipe = parse_recipe(BASE, overrides=["stages.0.train.finetune.lr=0.5", "data.eval.batch_size=7"])
    assert recipe.stages[0].config.finetune.lr == 0.5
    assert recipe.body.data.eval.batch_size == 7
    assert recipe.overrides == ("stages.0.train.finetune.lr=0.5", "data.eval.batch_size=7")


def test_override_can_add_a_missing_section() -> None:
    recipe = parse_recipe(BASE, overrides=["data.calibration={source: digits, limit: 32}"])
    assert recipe.body.data.calibration.limit == 32


def test_override_into_a_bad_value_is_reported_as_set() -> None:
    message = error_of(BASE, overrides=("stages.0.train.finetune.lr=abc",))
    assert message.startswith("--set stages.0.train.finetune.lr:")
    assert "valid number" in message and "'abc'" in message
    assert "recipe.yaml" not in message  # the file is fine; the override is not


def test_override_with_unknown_key_is_reported_as_set() -> None:
    message = error_of(BASE, overrides=("stages.0.train.finetune.lrr=1",))
    assert message.startswith("--set stages.0.train.finetune.lrr: unknown key 'lrr'; did you mean 'lr'?")


def test_override_list_index_out_of_range() -> None:
    message = error_of(BASE, overrides=("stages.3.train.finetune.lr=1",))
    assert message == "--set stages.3.train.finetune.lr: 'stages.3' is not an index of a list of 1 items"


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("noequals", "--set noequals: expected dotted.key=value"),
        ("name.x=1", "--set name.x: 'name' is a value, not a section"),
    ],
)
def test_malformed_override(item: str, expected: str) -> None:
    assert error_of(BASE, overrides=(item,)) == expected


def test_error_elsewhere_still_points_at_the_file_despite_overrides() -> None:
    message = error_of(BASE.replace("epochs: 1", "epochs: x"), overrides=("seed=3",))
    assert message.startswith("recipe.yaml:11 stages.0.train.finetune.epochs:")


# --------------------------------------------------------------------------------------------
# resolved()


def test_resolved_fills_defaults_and_round_trips() -> None:
    recipe = parse_recipe(BASE)
    resolved = recipe.resolved()
    assert resolved["metric"] == "top1" and resolved["seed"] == 0 and resolved["device"] == "auto"
    assert resolved["data"]["eval"]["batch_size"] == 64
    assert resolved["data"]["calibration"] is None
    finetune = resolved["stages"][0]["train"]["finetune"]
    assert finetune["optimizer"] == "sgd" and finetune["schedule"] == "cosine" and finetune["lr"] == 0.01
    again = parse_recipe(yaml.safe_dump(resolved, sort_keys=False))
    assert again.resolved() == resolved


def test_resolved_reflects_overrides() -> None:
    resolved = parse_recipe(BASE, overrides=["stages.0.train.finetune.epochs=4"]).resolved()
    assert resolved["stages"][0]["train"]["finetune"]["epochs"] == 4


def test_val_holdout_outside_zero_one_names_line_and_field() -> None:
    text = BASE.replace("  eval:", "  val: {holdout: 1.5}\n  eval:")
    assert error_of(text) == "recipe.yaml:7 data.val.holdout: Input should be less than 1 (got 1.5)"
    assert error_of(BASE, ("data.val.holdout=0",)) == "--set data.val.holdout: Input should be greater than 0 (got 0)"
    text = BASE.replace("  eval:", "  val: {holdout: 0.1, source: digits}\n  eval:")
    assert error_of(text) == "recipe.yaml:7 data.val.source: unknown key 'source' (allowed: holdout)"
    text = BASE.replace("  eval:", "  val: 0.1\n  eval:")
    assert error_of(text).startswith("recipe.yaml:7 data.val: expected {holdout: F} (a fraction of data.train) or a split")


def test_val_takes_a_holdout_or_a_split_of_its_own() -> None:
    from compress.recipe import DigitsData, Holdout

    holdout = parse_recipe(BASE.replace("  eval:", "  val: {holdout: 0.1}\n  eval:")).body.data.val
    assert holdout == Holdout(holdout=0.1)
    split = parse_recipe(BASE.replace("  eval:", "  val: {source: digits, split: test, limit: 50}\n  eval:")).body.data.val
    assert isinstance(split, DigitsData) and split.limit == 50
    assert parse_recipe(BASE).resolved()["data"]["val"] is None
