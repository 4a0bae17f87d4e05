"""Recipe schema, loading and validation.

A recipe is YAML data (``yaml.SafeLoader``: no tags that run code; size, nesting depth and alias
expansion bounded). It is validated with pydantic
models that reject unknown keys; every error becomes one line naming the file, the YAML line and
the dotted field, e.g. ``recipe.yaml:14 stages.2.train.finetune.lr: ...``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

import compress.stages.builtin  # noqa: F401  every built-in stage type registers itself on import
from compress.config import SafeName, Seed, Strict, describe_error
from compress.data_config import _HOLDOUT_TAG, _SPLIT_TAG, SOURCE_NAMES
from compress.data_config import DataSection as DataSection
from compress.data_config import DigitsData as DigitsData  # `X as X`: re-exported, the recipe's names
from compress.data_config import Holdout as Holdout
from compress.data_config import ImageFolderData as ImageFolderData
from compress.data_config import NpzData as NpzData
from compress.data_config import PythonData as PythonData
from compress.errors import RecipeError, did_you_mean
from compress.export.options import BACKEND_NAMES
from compress.metrics import MetricSpec
from compress.model_spec import ModelSpec
from compress.safe_yaml import MAX_YAML_BYTES, safe_yaml
from compress.safe_yaml import MAX_YAML_DEPTH as MAX_YAML_DEPTH
from compress.stages.spec import StageSpec as StageSpec

# --------------------------------------------------------------------------------------------
# Sections


class RecipeBody(Strict):
    """The top level of a recipe; ``stages`` are validated one by one against the stage registry."""

    name: SafeName
    model: ModelSpec
    data: DataSection
    metric: MetricSpec = Field(default_factory=MetricSpec)
    seed: Seed = 0
    device: str = "auto"
    stages: list[Any] = Field(default_factory=list)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d{1,4})?", v):  # torch cannot parse cuda:99999999999999999999
            raise ValueError(f"unknown device '{v}' (auto, cpu, cuda, cuda:N)")
        return v


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: the body plus typed stage configs."""

    body: RecipeBody
    stages: tuple[StageSpec, ...]
    source: str = "<recipe>"
    overrides: tuple[str, ...] = field(default=())
    lines: dict[tuple[Any, ...], int] = field(default_factory=dict, compare=False, repr=False)

    def locate(self, *path: Any) -> str:
        """``file:line dotted.path`` for errors found after parsing (data, stage options)."""
        dotted = ".".join(str(p) for p in path)
        for n in range(len(path), 0, -1):
            if path[:n] in self.lines:
                return f"{self.source}:{self.lines[path[:n]]} {dotted}"
        return dotted

    @property
    def name(self) -> str:
        return self.body.name

    def resolved(self) -> dict[str, Any]:
        """The recipe with every default filled in, as plain data (written to DIR/recipe.yaml)."""
        data = self.body.model_dump(mode="json", exclude={"stages"})
        data["stages"] = [s.dump() for s in self.stages]
        return data


# --------------------------------------------------------------------------------------------
# Loading


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override and validate a recipe file.

    Args:
        path: the YAML file.
        overrides: ``dotted.key=value`` strings; values are parsed as YAML (``256``, ``true``, ``[1, 2]``).

    Raises:
        RecipeError: with ``file:line dotted.field: what is wrong`` as its message.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:  # bounded: a recipe named /dev/zero must not fill the memory
            raw = f.read(MAX_YAML_BYTES + 1)
        if len(raw) > MAX_YAML_BYTES:
            raise RecipeError(f"{path}: over {MAX_YAML_BYTES:,} bytes; a recipe is a page of settings, not data")
        text = raw.decode()
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc}") from None
    return parse_recipe(text, source=str(path), overrides=overrides)


def parse_recipe(text: str, *, source: str = "<recipe>", overrides: Sequence[str] = ()) -> Recipe:
    """Validate recipe text; see :func:`load_recipe`."""
    data, lines = _read_yaml(text, source)
    if not isinstance(data, dict):
        raise RecipeError(f"{source}:1: a recipe must be a mapping with name, model, data, stages")
    overridden: set[tuple[str, ...]] = set()
    for item in overrides:
        overridden.add(_apply_override(data, item))
    where = _Locator(source, lines, data, overridden)
    _check_plain(data, (), where)
    try:
        body = RecipeBody.model_validate(data)
    except ValidationError as exc:
        raise where.error(exc) from None
    stages = tuple(_parse_stage(i, entry, where) for i, entry in enumerate(body.stages))
    return Recipe(body=body, stages=stages, source=source, overrides=tuple(overrides), lines=lines)


_PLAIN = (str, int, float, bool, type(None))


def _check_plain(node: Any, path: tuple[Any, ...], where: _Locator) -> None:
    """Refuse values YAML makes from tags or unquoted look-alikes (dates, bytes, sets): a recipe is plain data,
    and the run directory's recipe.yaml must read back the same."""
    if isinstance(node, dict):
        for key, value in node.items():
            if not isinstance(key, _PLAIN):
                raise where.at(path, f"a key of type {type(key).__name__} ({key!r}); keys are names")
            _check_plain(value, (*path, key), where)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_plain(value, (*path, i), where)
    elif not isinstance(node, _PLAIN):
        shown = repr(node)
        shown = shown[:60] + "..." if len(shown) > 64 else shown
        raise where.at(path, f"{shown} is a {type(node).__name__}, not recipe data (text, a number, true/false, null, "
                             "a list or a mapping); quote it if it is text")


def _parse_stage(index: int, entry: Any, where: _Locator) -> StageSpec:
    from compress.stages.registry import stage_types

    registry = stage_types()
    loc: tuple[Any, ...] = ("stages", index)
    if not isinstance(entry, dict) or len(entry) != 1:
        raise where.at(loc, "each stage is a mapping with one key, the stage type (e.g. '- train: {...}')")
    (kind, options), = entry.items()
    if kind not in registry:
        raise where.at(
            loc, f"unknown stage type '{kind}'{did_you_mean(str(kind), registry)} ({', '.join(sorted(registry))})"
        )
    options = _distill_into_finetune(kind, options, registry[kind].config, loc, where)
    try:
        config = registry[kind].config.model_validate({} if options is None else options)
    except ValidationError as exc:
        raise where.error(exc, prefix=(*loc, kind)) from None
    return StageSpec(index=index, type=kind, config=config)


def _distill_into_finetune(
    kind: str, options: Any, config: type[BaseModel], loc: tuple[Any, ...], where: _Locator
) -> Any:
    """``qat: {finetune: {...}, distill: {...}}`` (DESIGN.md) means ``finetune.distill``: move it there,
    and let error lines still point at the key the user wrote."""
    if kind == "distill" or not isinstance(options, dict) or "distill" not in options or "finetune" not in config.model_fields:
        return options
    here = (*loc, kind)
    if options["distill"] is None:
        return {k: v for k, v in options.items() if k != "distill"}
    finetune = options.get("finetune")
    if finetune is None:  # the stage's own defaults (qat: epochs 1, lr 1e-3), not FinetuneConfig's
        finetune = config.model_fields["finetune"].get_default(call_default_factory=True).model_dump(exclude_unset=True)
    if not isinstance(finetune, dict):
        return options  # validation reports the malformed finetune
    if "distill" in finetune:
        raise where.at((*here, "distill"), "given both here and in finetune.distill; keep one")
    for path, line in list(where.lines.items()):
        if path[: len(here) + 1] == (*here, "distill"):
            where.lines[(*here, "finetune", *path[len(here):])] = line
    rest = {k: v for k, v in options.items() if k != "distill"}
    return {**rest, "finetune": {**finetune, "distill": options["distill"]}}



def _read_yaml(text: str, source: str) -> tuple[Any, dict[tuple[Any, ...], int]]:
    """Parse YAML safely, returning the data and a map from key path to 1-based line number."""
    try:
        data, root = safe_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and start is not None and mark is not None and start.line != mark.line:
            problem += f" ({context} at line {start.line + 1})"  # e.g. an unclosed quote opened earlier
        raise RecipeError(f"{source}{line}: invalid YAML: {problem}") from None
    lines: dict[tuple[Any, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[Any, ...]) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key, value in node.value:
                name = key.value
                if name in seen:
                    dotted = ".".join(str(p) for p in (*path, name))
                    raise RecipeError(f"{source}:{key.start_mark.line + 1} {dotted}: duplicate key '{name}'")
                seen.add(name)
                lines[(*path, name)] = key.start_mark.line + 1
                walk(value, (*path, name))
        elif isinstance(node, yaml.SequenceNode):
            for i, value in enumerate(node.value):
                walk(value, (*path, i))

    if root is not None:
        walk(root, ())
    return data, lines


def _apply_override(data: dict[str, Any], item: str) -> tuple[str, ...]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise RecipeError(f"--set {item}: expected dotted.key=value")
    try:
        value = safe_yaml(raw)[0] if raw else None
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"--set {key}: '{where}' is not an index of a list of {len(node)} items")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise RecipeError(f"--set {key}: '{'.'.join(parts[:depth])}' is a value, not a section")
    return tuple(parts)


class _Locator:
    """Turns pydantic error locations into ``file:line dotted.path`` prefixes."""

    def __init__(
        self, source: str, lines: dict[tuple[Any, ...], int], data: Any, overridden: set[tuple[str, ...]]
    ) -> None:
        self.source, self.lines, self.data, self.overridden = source, lines, data, overridden

    def _data_path(self, loc: Sequence[Any]) -> tuple[Any, ...]:
        """Drop pydantic's union-member tags: keep only steps that exist in the data."""
        node, path = self.data, []
        for step in loc:
            if isinstance(node, dict) and step in node:
                node = node[step]
                path.append(step)
            elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
                node = node[step]
                path.append(step)
            elif not (isinstance(node, dict) and isinstance(step, str) and step in _TAGS):
                path.append(step)  # a missing field: still part of what the user must fix
                node = None
        return tuple(path)

    def prefix(self, loc: Sequence[Any]) -> str:
        path = self._data_path(loc)
        dotted = ".".join(str(p) for p in path) or "(top level)"
        as_str = tuple(str(p) for p in path)
        # the error is inside an overridden value, or at a key that only the override created
        if any(as_str[: len(o)] == o or (o[: len(as_str)] == as_str and path not in self.lines) for o in self.overridden):
            return f"--set {dotted}:"
        for n in range(len(path), -1, -1):
            if path[:n] in self.lines:
                return f"{self.source}:{self.lines[path[:n]]} {dotted}:"
        return f"{self.source} {dotted}:"

    def at(self, loc: Sequence[Any], message: str) -> RecipeError:
        return RecipeError(f"{self.prefix(loc)} {message}")

    def error(self, exc: ValidationError, prefix: tuple[Any, ...] = ()) -> RecipeError:
        errors = exc.errors(include_url=False)
        first = errors[0]
        loc = (*prefix, *first["loc"])
        if first["type"] in ("unknown_key", "bool_for_number", "number_too_large"):
            loc = (*loc, first["ctx"]["key"])
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        return self.at(loc, describe_error(first, tag_values={"source": SOURCE_NAMES}) + more)


# pydantic inserts the discriminator tag of a union member into error locations.
_TAGS = {*SOURCE_NAMES, _HOLDOUT_TAG, _SPLIT_TAG, *BACKEND_NAMES}
