"""Base of every typed config (recipe sections and core options alike).

:class:`Strict` pydantic models: frozen, unknown keys refused with a suggestion, no NaN/infinity, no
yes/no where a number is wanted, no integer beyond 64 bits. Also the bounded types they share (seeds,
paths, folder names) and :func:`describe_error`, which turns a pydantic error into one line.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from compress.errors import did_you_mean


class Strict(BaseModel):
    """Base for every recipe section: frozen, and unknown keys are errors with a suggestion."""

    # allow_inf_nan: no float option means anything at NaN or infinity (`lr: .inf` would train to NaN)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            allowed = list(cls.model_fields)
            for key in data:
                if key not in cls.model_fields:
                    raise PydanticCustomError(
                        "unknown_key",
                        "unknown key '{key}'{hint} (allowed: {allowed})",
                        {"key": str(key), "hint": did_you_mean(str(key), allowed), "allowed": ", ".join(allowed)},
                    )
                _check_number(str(key), data[key], cls.model_fields[key].annotation)
        return data


# Any integer a recipe gives ends up in C (torch, numpy, sklearn) at 64 bits at most.
_INT64 = 2**63 - 1


def _check_number(key: str, value: Any, annotation: Any) -> None:
    """Refuse a yes/no where a number (or a list of numbers) is wanted, and integers beyond 64 bits."""
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, bool) and _wants_number(annotation):
            # pydantic's lax mode would turn `epochs: yes` into 1 (and [true, 8] into [1, 8]); a yes/no is never a count
            raise PydanticCustomError(
                "bool_for_number", "expected a number, got {value}", {"key": key, "value": str(item).lower()}
            )
        if isinstance(item, int) and not isinstance(item, bool) and abs(item) > _INT64:
            raise PydanticCustomError(
                "number_too_large", "{value} does not fit in 64 bits", {"key": key, "value": str(item)}
            )


def _wants_number(annotation: Any) -> bool:
    """True when a field takes int/float but not bool (so ``true``/``false`` is a mistake)."""
    found: set[Any] = set()

    def walk(tp: Any) -> None:
        found.add(tp)
        for arg in typing.get_args(tp):
            walk(arg)

    walk(annotation)
    return bool(found & {int, float}) and bool not in found and Any not in found


# sklearn and numpy take seeds in 0..2**32-1; one range everywhere, so a seed valid in one place is valid in all
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


def _check_path(value: str) -> str:
    """A file or folder path the OS can take: not empty, no NUL byte, within Linux's name and path limits."""
    if not value.strip():
        raise ValueError("empty path")
    if "\0" in value:
        raise ValueError("a path cannot contain a NUL character")
    if len(value.encode()) > 4095 or any(len(part.encode()) > 255 for part in value.split("/")):
        raise ValueError(f"path too long ({len(value)} characters; at most 255 per folder or file name, 4095 in all)")
    return value


PathStr = Annotated[str, AfterValidator(_check_path)]


# A name that becomes a folder (runs/NAME, triton/NAME): letters, digits, . _ -, starting with a letter or
# digit (so never '.', '..' or a hidden folder), at most 100 characters (no OS path-length traceback).
SafeName = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")]


def describe_error(err: Any, tag_values: Mapping[str, Sequence[str]] | None = None) -> str:
    """A pydantic error (one of ``ValidationError.errors()``) as one line, without its location.

    ``tag_values``: each discriminated union's tag values by field name (``{"source": ("digits", ...)}``),
    listed when a mapping lacks the tag.
    """
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "missing":
        return "missing required field"
    if kind in ("literal_error", "enum"):
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", ""))) or re.findall(
            r"(\S+?)(?:,| or |$)", str(ctx.get("expected", ""))
        )
        return f"unknown {value!r}{did_you_mean(str(value), choices)} ({', '.join(choices)})"
    if kind == "union_tag_invalid":
        tags = re.findall(r"'([^']*)'", str(ctx.get("expected_tags", "")))
        discriminator = str(ctx.get("discriminator", "value")).strip("'")
        return f"unknown {discriminator} {ctx.get('tag')!r}{did_you_mean(str(ctx.get('tag')), tags)} ({', '.join(tags)})"
    if kind == "union_tag_not_found":
        discriminator = str(ctx.get("discriminator", "tag"))
        known = (tag_values or {}).get(discriminator.strip("'"))
        return f"missing {discriminator}" + (f" (one of {', '.join(known)})" if known else "")
    msg = err["msg"]
    msg = msg.removeprefix("Value error, ")
    if kind != "unknown_key" and value is not None and not isinstance(value, dict | list) and not (
        isinstance(value, str) and repr(value) in msg
    ):
        shown = repr(value)
        msg += f" (got {shown[:60] + '...' if len(shown) > 64 else shown})"  # a 300-character value stays readable
    return msg
