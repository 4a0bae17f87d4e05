"""Choosing layers by name: fnmatch ``include``/``exclude`` patterns, shared by every stage that takes them."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

from compress.errors import CompressError


def matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_names(
    names: Sequence[str],
    include: Sequence[str],
    exclude: Sequence[str],
    *,
    where: str,
    what: str,
    deferred: Callable[[str], bool] = lambda _pattern: False,
) -> list[str]:
    """The ``names`` matching ``include`` (all when empty) and no ``exclude`` pattern, in order.

    Args:
        names: candidate layer names, e.g. every Conv/Linear of the model.
        where: the recipe location or API name errors start with.
        what: how the candidates are described in errors, e.g. "quantizable layer".
        deferred: patterns this function neither checks nor applies (resolved later by the caller).

    Raises:
        CompressError: a pattern matches no candidate, or nothing is left.
    """
    prefix = f"{where}." if where else ""
    if not names:
        raise CompressError(f"{where}: the model has no {what}")
    for key, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns:
            if not deferred(pattern) and not any(matches(n, [pattern]) for n in names):
                shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
                raise CompressError(f"{prefix}{key}: pattern '{pattern}' matches no {what}; layers: {shown}")
    wanted = [p for p in include if not deferred(p)]
    chosen = [n for n in names if (not wanted or matches(n, wanted)) and not matches(n, exclude)]
    if not chosen:
        raise CompressError(f"{prefix}include/exclude: leave no {what}")
    return chosen

