"""The one place where ``"module:callable"`` strings from recipes become Python objects."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from compress.errors import CompressError


def check_reference(ref: str) -> str:
    """Validate the shape of a ``module:callable`` string without importing anything."""
    module, sep, attr = ref.partition(":")
    if not sep or not module or not attr or any(not p.isidentifier() for p in module.split(".")) or any(
        not p.isidentifier() for p in attr.split(".")
    ):
        raise ValueError(f"'{ref}' is not of the form 'module:callable' (e.g. 'compress.zoo:digits_cnn')")
    return ref


def resolve(ref: str, *, what: str = "callable") -> Callable[..., Any]:
    """Import ``module:attr`` and return the attribute, which must be callable.

    Raises:
        CompressError: the module cannot be imported, or the attribute is missing or not callable.
    """
    check_reference(ref)
    module_name, _, attr_path = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise CompressError(f"{what} '{ref}': cannot import module '{module_name}': {exc}") from exc
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise CompressError(f"{what} '{ref}': module '{module_name}' has no attribute '{attr_path}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CompressError(f"{what} '{ref}': '{attr_path}' is not callable")
    return obj
