"""Recipes that ask too much of the parser or hold numbers no run can use (issue 16): one line, exit 2.

YAML bounds (size, nesting depth, alias expansion) are tested on :func:`parse_recipe` and
:func:`load_recipe` directly; number bounds through ``compress validate --set`` on the tiny recipe.
"""

from __future__ import annotations

import time
import typing
from pathlib import Path

import pytest

import compress.distill.stage  # noqa: F401 - registers every stage config (Strict subclasses below)
from compress.config import _wants_number
from compress.errors import RecipeError
from compress.recipe import MAX_YAML_BYTES, MAX_YAML_DEPTH, Strict, load_recipe, parse_recipe
from compress.stages.registry import stage_types


def _billion_laughs(copies: int = 8) -> str:
    """Nine levels of ten aliases each: 10^9 strings once expanded per copy, about 500 bytes a copy."""
    lines = []
    for c in range(copies):
        lines.append(f'a{c}_0: &a{c}_0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]')
        lines += [f"a{c}_{i}: &a{c}_{i} [" + ",".join([f"*a{c}_{i - 1}"] * 10) + "]" for i in range(1, 9)]
    return "\n".join([*lines, f"name: [*a{copies - 1}_8]", ""])


def _refused(text: str) -> str:
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, source="r.yaml")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_billion_laughs_is_refused_fast() -> None:
    text = _billion_laughs()  # ~5 KB, as in the issue
    assert 4_000 < len(text) < 6_000
    start = time.perf_counter()
    message = _refused(text)
    # before: 111 s to expand and then a schema error; the bound is checked on the unexpanded node graph
    assert time.perf_counter() - start < 1.0
    assert "expands to more than 100,000 values" in message and message.startswith("r.yaml:")


def test_recursive_alias_is_refused_not_a_recursion_error() -> None:
    assert _refused("name: &a [*a]\n") == "r.yaml:1: invalid YAML: an alias refers to the value that contains it"
    assert "refers to the value that contains it" in _refused("model: &m {kwargs: *m}\nname: x\n")


@pytest.mark.parametrize("text", [
    "name: " + "[" * 5000 + "]" * 5000 + "\n",
    "name: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n",
    "name: x\nmodel:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(200)) + "  " * 201 + "v: 1\n",
])
def test_deep_nesting_is_refused(text: str) -> None:
    assert f"nested deeper than {MAX_YAML_DEPTH} levels" in _refused(text)


def test_size_bound(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("name: x\n" + "# padding\n" * (MAX_YAML_BYTES // 10 + 1))
    with pytest.raises(RecipeError, match=r"big.yaml: over 1,000,000 bytes"):
        load_recipe(big)
    with pytest.raises(RecipeError, match="over 1,000,000 bytes"):  # read in a bounded way, not to the end
        load_recipe("/dev/zero")


def test_anchors_and_aliases_within_bounds_still_work(tiny_recipe_text: str) -> None:
    text = tiny_recipe_text.replace("{epochs: 1, lr: 0.05}", "&ft {epochs: 1, lr: 0.05}") + "  - train: {finetune: *ft}\n"
    recipe = parse_recipe(text)
    assert [s.config.finetune.lr for s in recipe.stages] == [0.05, 0.05]


# --------------------------------------------------------------------------------------------
# Numbers


@pytest.mark.parametrize(("override", "expected"), [
    ("seed=1180591620717411303424", "--set seed: 1180591620717411303424 does not fit in 64 bits"),
    ("seed=4294967296", "--set seed: Input should be less than or equal to 4294967295 (got 4294967296)"),
    ("data.train.seed=-1", "--set data.train.seed: Input should be greater than or equal to 0 (got -1)"),
    ("stages.0.train.finetune.seed=-5", "--set stages.0.train.finetune.seed: Input should be greater than or equal to 0"),
    ("stages.0.train.finetune.lr=.inf", "--set stages.0.train.finetune.lr: Input should be a finite number (got inf)"),
    ("stages.0.train.finetune.lr=.nan", "--set stages.0.train.finetune.lr: Input should be a finite number (got nan)"),
    ("stages.0.train.finetune.momentum=-.inf", "--set stages.0.train.finetune.momentum: Input should be a finite number"),
    ("stages.0.train.finetune.distill={temperature: 1e30}",
     "--set stages.0.train.finetune.distill.temperature: Input should be less than or equal to 100"),
    ("stages.0.train.finetune.batch_size=true", "--set stages.0.train.finetune.batch_size: expected a number, got true"),
    ("data.eval.limit=99999999999999999999", "--set data.eval.limit: 99999999999999999999 does not fit in 64 bits"),
    ("model.checkpoint=" + "a" * 300, "--set model.checkpoint: path too long (300 characters"),
    ("model.input_shape=[1, true, 8]", "--set model.input_shape: expected a number, got true"),
    ("device=cuda:99999999999999999999", "--set device: unknown device 'cuda:99999999999999999999'"),
    ("stages.0.train.finetune.epochs=1000000000",  # a typo must not mean a run that never ends
     "--set stages.0.train.finetune.epochs: Input should be less than or equal to 100000"),
    ("stages=[{export: {engine: {bench_iters: 1000000000}}}]",
     "--set stages.0.export.engine.bench_iters: Input should be less than or equal to 100000"),
    # a process each: validate itself starts them to read the first batch
    ("data.eval.workers=100000", "--set data.eval.workers: Input should be less than or equal to 128"),
    ("data.eval={source: imagefolder, root: x, resize: 1000000}",
     "--set data.eval.resize: Input should be less than or equal to 4096"),
])
def test_numbers_out_of_bounds_are_one_line(cli, write_recipe, tiny_recipe_text, override, expected) -> None:
    recipe = write_recipe(tiny_recipe_text)
    assert cli("validate", recipe, "--set", override, "--quiet").error_line().startswith(expected)


def test_export_batch_sizes_with_a_yes_is_refused(cli, write_recipe, tiny_recipe_text) -> None:
    """`batch_sizes: [true, 8]` was taken as batch size 1."""
    recipe = write_recipe(tiny_recipe_text + "  - export: {engine: {batch_sizes: [true, 8]}}\n")
    line = cli("validate", recipe, "--quiet").error_line()
    assert line == f"{recipe}:11 stages.1.export.engine.batch_sizes: expected a number, got true"


@pytest.mark.parametrize("engine", ["{batch_sizes: [1, 1000000000]}", "{backend: tensorrt, profile: {max: 1000000000}}"])
def test_engine_batch_sizes_are_bounded(cli, write_recipe, tiny_recipe_text, engine) -> None:
    """The bench input for a batch of 10^9 digits needs 256 GB: refused by validate, not at the end of a run."""
    recipe = write_recipe(tiny_recipe_text + f"  - export: {{engine: {engine}}}\n")
    assert "Input should be less than or equal to 65536" in cli("validate", recipe, "--quiet").error_line()


def test_largest_seed_is_accepted(cli, write_recipe, tiny_recipe_text) -> None:
    recipe = write_recipe(tiny_recipe_text)
    result = cli("validate", recipe, "--set", "seed=4294967295", "--set", "data.train.seed=4294967295", "--quiet")
    assert result.code == 0, result.err


def test_test_fraction_that_empties_a_split_says_the_sizes(cli, write_recipe, tiny_recipe_text) -> None:
    recipe = write_recipe(tiny_recipe_text)
    line = cli("validate", recipe, "--set", "data.eval.test_fraction=0.0001", "--quiet").error_line()
    assert line == (f"{recipe}:7 data.eval: test_fraction 0.0001 splits the 1797 digits into 1796 train and 1 test "
                    "samples; each side needs at least 10 (one per class)")
    line = cli("validate", recipe, "--set", "data.train.test_fraction=0.9999", "--quiet").error_line()
    assert "into 0 train and 1797 test samples" in line and line.startswith(f"{recipe}:6 data.train:")
    # ceil(0.0055 * 1797) = 10 test samples: one per class, the smallest stratified split there is
    assert cli("validate", recipe, "--set", "data.eval.test_fraction=0.0055", "--quiet").code == 0


def _strict_models() -> list[type[Strict]]:
    stage_types()  # import every stage's config
    found, todo = [], [Strict]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_recipe_section_refuses_nan_and_infinity() -> None:
    models = _strict_models()
    assert len(models) > 20  # the recipe body, data sources, every stage and finetune/distill section
    assert all(cls.model_config.get("allow_inf_nan") is False for cls in models)


def test_every_number_field_refuses_a_yes_or_no() -> None:
    checked = 0
    for cls in _strict_models():
        for name, info in cls.model_fields.items():
            if not _wants_number(info.annotation):
                continue
            as_list = typing.get_origin(info.annotation) is list or "list[" in str(info.annotation)
            with pytest.raises(Exception, match="expected a number, got true"):
                cls.model_validate({name: [True, 8] if as_list else True})
            checked += 1
    assert checked > 30


@pytest.mark.parametrize("args", [["--threads", "0"], ["--threads", "1000000"], ["--batch-sizes", "1", "1000000000"]])
def test_bench_threads_and_batch_sizes_are_bounded(cli, args) -> None:
    line = cli("bench", "model.onnx", "--input-shape", "1,8,8", *args).error_line()
    assert line == ("bench: --batch-sizes, --iters and --threads must be positive (batch sizes at most 65536, threads "
                    "at most 1024), --warmup >= 0")


@pytest.mark.parametrize(("value", "kind"), [("2020-01-01", "date"), ("!!binary /w==", "bytes"),
                                             ("!!set {a: null}", "set"), ("2001-12-14t21:59:43.10-05:00", "datetime")])
def test_yaml_values_that_are_not_plain_data(tiny_recipe_text: str, value: str, kind: str) -> None:
    """A date or bytes in kwargs got past the schema; bytes then broke writing DIR/recipe.yaml (not JSON)."""
    message = _refused(tiny_recipe_text.replace("{hidden: 8}", f"{{hidden: 8, note: {value}}}"))
    assert message.startswith("r.yaml:4 model.kwargs.note: ") and f"is a {kind}, not recipe data" in message


@pytest.mark.parametrize("mapping", ["&a [*a]", "[" * 3000 + "]" * 3000])
def test_data_kwargs_yaml_is_bounded_like_a_recipe(cli, mapping) -> None:
    line = cli("bench", "model.onnx", "--data", "digits", "--data-kwargs", mapping).error_line()
    assert line.startswith("--data digits: --data-kwargs '") and line.endswith("does not parse as JSON or YAML")
    assert len(line) < 200
