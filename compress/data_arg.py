"""The ``--data`` shorthand of ``compress check`` and ``compress bench``, both ways.

``digits:test?size=32&channels=3``, ``npz:FILE``, ``imagefolder:DIR`` or ``python:pkg.mod:fn?split=test``:
a source, its main option, then ``?key=value&...`` options (values read as YAML scalars) and/or a
``--data-kwargs`` mapping. For a python factory the options are its keyword arguments; for the
built-in sources, the data spec's fields. :func:`describe_spec` writes a spec back in this form with
every option in effect, a factory's defaults included, so a report shows what was really read.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any, cast

import yaml
from pydantic import ValidationError

from compress.config import describe_error
from compress.data_config import SOURCE_NAMES, SOURCES, DataSpec, PythonData
from compress.errors import DataError, did_you_mean
from compress.imports import resolve
from compress.safe_yaml import safe_yaml

_SOURCES = dict(zip(SOURCE_NAMES, SOURCES, strict=True))  # each source's spec class
FORMS = ", ".join(cls.SHORTHAND for cls in SOURCES[:-1]) + f" or {SOURCES[-1].SHORTHAND}"
_FORMS = f"{FORMS}, each with optional ?key=value&..."
_LOADER_FIELDS = ("batch_size", "limit", "shuffle", "workers")


_INT = re.compile(r"[-+]?(0|[1-9][0-9]*)")
_FLOAT = re.compile(r"[-+]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)([eE][-+]?[0-9]+)?")
_WORDS = {"true": True, "false": False, "null": None, "none": None}


def _scalar(raw: str, where: str, key: str) -> Any:
    """An option's value: an int, a float, true/false, null (also an empty value), or else the text itself.

    Plain rules rather than YAML's: YAML 1.1 reads ``010`` as 8, ``no``/``on`` as booleans and
    ``1.10`` as 1.1, none of which a split name or a count should become.
    """
    if _INT.fullmatch(raw):
        return int(raw)
    if _FLOAT.fullmatch(raw) and any(c in raw for c in ".eE"):
        return float(raw)
    if raw.lower() in _WORDS:
        return _WORDS[raw.lower()]
    return raw if raw else None  # `y=`: null, e.g. an npz without labels


def _query(query: str, where: str) -> dict[str, Any]:
    """``a=1&b=test`` -> ``{"a": 1, "b": "test"}``."""
    options: dict[str, Any] = {}
    for part in query.split("&"):
        key, eq, raw = part.partition("=")
        key = key.strip()
        if not eq or not key:
            raise DataError(f"{where}: option '{part}' is not key=value (write ?key=value&key2=value2)")
        if key in options:
            raise DataError(f"{where}: option '{key}' given twice")
        options[key] = _scalar(raw.strip(), where, key)
    return options


def _mapping(text: str, where: str) -> dict[str, Any]:
    """``--data-kwargs``: a JSON or YAML mapping with text keys."""
    shown = text if len(text) <= 64 else text[:60] + "..."
    try:
        value = safe_yaml(text)[0]  # bounded like a recipe: no alias bomb, no deep nesting
    except yaml.YAMLError:
        raise DataError(f"{where}: --data-kwargs '{shown}' does not parse as JSON or YAML") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise DataError(f"{where}: --data-kwargs '{shown}' is not a mapping like '{{\"split\": \"test\"}}'")
    return value


def factory_parameters(fn: Callable[..., Any]) -> dict[str, inspect.Parameter] | None:
    """The keyword arguments ``fn`` takes, or None when it takes any (``**kwargs``) or cannot be inspected."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {name: p for name, p in params.items() if p.kind in kinds}


def check_factory_kwargs(spec: PythonData, where: str) -> None:
    """Refuse a keyword the factory does not take, naming what it takes.

    Raises:
        DataError: ``where: fn takes no argument 'splt'; did you mean 'split'? (takes split, n)``.
    """
    params = factory_parameters(resolve(spec.factory, what=f"{where}: factory"))
    if params is None:
        return
    for key in spec.kwargs:
        if key not in params:
            takes = ", ".join(params) or "no arguments"
            raise DataError(f"{where}: {spec.factory} takes no argument '{key}'{did_you_mean(key, params)} (takes {takes})")


def parse_data_arg(text: str, batch_size: int = 64, kwargs: str | None = None) -> DataSpec:
    """The data spec a ``--data`` value (and ``--data-kwargs`` mapping) names.

    Args:
        text: ``SOURCE[:MAIN][?key=value&...]``; see the module docstring.
        batch_size: the spec's batch size unless an option sets ``batch_size``.
        kwargs: ``--data-kwargs``, a JSON/YAML mapping merged with the ``?`` options.

    Raises:
        DataError: one line naming the ``--data`` value: an unknown source, options that do not
            parse, an option given twice, or a key the source (or the factory) does not take.
    """
    where = f"--data {text}"
    base, has_query, query = text.partition("?")
    options = _query(query, where) if has_query else {}
    if kwargs is not None:
        extra = _mapping(kwargs, where)
        twice = sorted(set(options) & set(extra))
        if twice:
            raise DataError(f"{where}: option '{twice[0]}' given both after '?' and in --data-kwargs")
        options.update(extra)
    source, _, main = base.partition(":")
    cls = _SOURCES.get(source)
    if cls is None or (not main and cls.model_fields[cls.MAIN_OPTION].is_required()):
        raise DataError(f"{where}: expected {_FORMS}")
    main_field = cls.MAIN_OPTION
    fields: dict[str, Any] = {"source": source, "batch_size": batch_size}
    if cls is PythonData:
        fields.update(factory=main, kwargs=options)
    else:
        if main and main_field in options:
            raise DataError(f"{where}: option '{main_field}' given both after ':' and as an option")
        fields.update({main_field: main or "test"} if main_field not in options else {})  # digits: the test split
        fields.update(options)
    try:
        spec = cast(DataSpec, cls(**fields))  # one of the SOURCES
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = [*err["loc"], *([err["ctx"]["key"]] if err["type"] == "unknown_key" else [])]
        raise DataError(f"{where}: {'.'.join(str(p) for p in loc) or 'options'}: {describe_error(err)}") from None
    if isinstance(spec, PythonData):
        check_factory_kwargs(spec, where)
    return spec


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return str(value)


def describe_spec(spec: DataSpec) -> str:
    """A spec as ``--data`` text with every option in effect (a python factory's defaults included).

    ``python:pkg.data:load?split=train&n=16`` says the factory read its train split even when nobody
    asked for one; the built-in sources list the options that differ from their defaults.
    """
    cls = _SOURCES[spec.source]
    main_field = cls.MAIN_OPTION
    options: dict[str, Any] = {}
    if isinstance(spec, PythonData):
        params = factory_parameters(resolve(spec.factory, what="factory"))
        options.update(spec.kwargs)
        for name, p in (params or {}).items():
            default = p.default
            if name not in options and default is not inspect.Parameter.empty and (
                default is None or isinstance(default, (bool, int, float, str))
            ):
                options[name] = default
    else:
        defaults = cls.model_fields
        for name, value in spec.model_dump().items():
            if name not in ("source", main_field, *_LOADER_FIELDS) and value != defaults[name].get_default(
                call_default_factory=True
            ):
                options[name] = value
    if spec.limit is not None and not isinstance(spec, PythonData):
        options["limit"] = spec.limit
    query = "&".join(f"{k}={_fmt(v)}" for k, v in options.items())
    text = f"{spec.source}:{getattr(spec, main_field)}" + (f"?{query}" if query else "")
    return text + (f" (first {spec.limit} samples)" if spec.limit is not None and isinstance(spec, PythonData) else "")
