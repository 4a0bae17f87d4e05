"""User-facing errors.

Every problem with what the user gave us (recipe, checkpoint, data, arguments) is a
:class:`CompressError`. The CLI prints its one-line message and exits with code 2; anything
else escaping is a bug in compress, not in the user's input.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterable, Iterator
from enum import Enum
from typing import Any, TypeVar

E = TypeVar("E", bound=Enum)


class CompressError(ValueError):
    """Bad input: printed as one line by the CLI, exit code 2."""

    def __init__(self, *args: object) -> None:
        # A DataLoader worker re-raises our error as ``type(msg)`` with msg = "Caught X in DataLoader
        # worker ...\nOriginal Traceback ...\npkg.X: <message>": keep only the original message.
        if len(args) == 1 and isinstance(args[0], str) and "\nOriginal Traceback" in args[0]:
            last = args[0].rstrip().splitlines()[-1]
            _, sep, message = last.partition(f"{type(self).__name__}: ")
            args = (message if sep else last,)
        super().__init__(*args)


class RecipeError(CompressError):
    """The recipe (or a ``--set`` override) is malformed or names something that does not exist."""


class CheckpointError(CompressError):
    """A checkpoint is missing, pickled, corrupt, or does not match the model."""


class DataError(CompressError):
    """A data spec cannot produce usable batches (empty, NaN/Inf, mismatched shapes or labels)."""


def first_line(exc: BaseException) -> str:
    """The first meaningful sentence of an exception's message, or its type name when it has none.

    Used wherever a library error (torch, ONNX Runtime, a user's code) is wrapped into a one-line
    :class:`CompressError`.
    """
    noise = ("Weights only load failed", "WeightsUnpickler error")
    for line in str(exc).splitlines():
        line = line.strip()
        if line and not any(n in line for n in noise):
            line = line.split(". ")[0]  # torch's errors go on for several sentences
            return line if type(exc) is RuntimeError else f"{type(exc).__name__}: {line}"
    return type(exc).__name__


def one_line(text: str) -> str:
    """Collapse whitespace so a message always prints on a single line."""
    return " ".join(str(text).split())


@contextlib.contextmanager
def located(where: str, source: str) -> Iterator[None]:
    """Prefix a :class:`CompressError` raised inside with ``where`` (a recipe's ``file:line key``).

    Used around work a recipe field leads to (loading its checkpoint, running a stage), so an error
    from deep inside (a checkpoint that does not fit, a metric that fails) still names the recipe line.
    An error that already names ``source`` (the recipe file) is left as it is.
    """
    try:
        yield
    except CompressError as exc:
        message = str(exc)
        if source in message:
            raise
        raise type(exc)(f"{where}: {message}") from None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'X'?"`` for the closest of ``choices`` to ``word``, or ``""`` when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def parse_enum(kind: type[E], value: Any, where: str = "", what: str = "") -> E:
    """``kind(value)``, or a one-line :class:`CompressError` listing the choices and the closest one.

    The message reads ``"{where}: unknown {what} '{value}' (choose from a, b); did you mean 'a'?"``
    (``where``/``what`` left out when empty).
    """
    try:
        return kind(value)
    except ValueError:
        choices = [str(k.value) for k in kind]
        head = f"{where}: " if where else ""
        noun = f"{what} " if what else ""
        raise CompressError(
            f"{head}unknown {noun}'{value}' (choose from {', '.join(choices)}){did_you_mean(str(value), choices)}"
        ) from None
