"""Structural changes recorded on a model so a checkpoint can rebuild it from its factory.

Stages that change a model's architecture (channel pruning, quantizer insertion, sparsity masks)
record a ``(kind, payload)`` entry; loading a checkpoint rebuilds the factory model and replays
the entries in order before loading the state_dict. Payloads hold only tensors, numbers, strings,
lists and dicts, so checkpoints stay loadable with ``torch.load(weights_only=True)``.

A checkpoint is a file from anywhere, so every kind registers a strict :class:`Payload` schema with
its rebuild: :func:`parse` checks every entry's types before the factory model is even built, and
the rebuild checks the payload against that model (names that exist, sizes it can have) before it
changes or allocates anything.

A kind may also register hooks that the core calls without knowing the kind: :func:`register_verify`
(run by :func:`verify` after a checkpoint's weights are loaded) and :func:`register_callbacks`
(training callbacks that keep the structure, asked by :func:`callbacks` at every fine-tune) and
:func:`register_enforce` (puts the hooks by which the model keeps the structure itself back on its
modules, asked by :func:`enforce` after a change replaced modules, e.g. ``quant.prepare``). Kinds
register when their module is imported; ``compress/__init__`` imports every kind's package, so a
kind is registered before any checkpoint can be loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from torch import fx, nn

from compress.callbacks import Callback
from compress.errors import CheckpointError, first_line, one_line


class Payload(BaseModel):
    """Base of a rebuild's payload schema: strict types (no 1.0 for 1, no "8" for 8), unknown keys refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, arbitrary_types_allowed=True)


P = TypeVar("P", bound=Payload)


@dataclass(frozen=True)
class _Rebuilder(Generic[P]):
    fn: Callable[[nn.Module, P], nn.Module]
    schema: type[P]


_REBUILDERS: dict[str, _Rebuilder[Any]] = {}
_VERIFIERS: dict[str, Callable[[nn.Module, str], None]] = {}
_CALLBACKS: dict[str, Callable[[nn.Module], Sequence[Callback]]] = {}
_ENFORCERS: dict[str, Callable[[nn.Module], None]] = {}
_ATTR = "_compress_origin"
PRESERVED = "_user_preserved_attributes"  # GraphModule.__deepcopy__ sets meta[this] as attributes of the copy


@dataclass
class Origin:
    """How a model was built: factory, kwargs, and the structural changes applied since."""

    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    structure: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Change:
    """One validated structure entry: its kind and its typed payload."""

    kind: str
    payload: Payload


def register_rebuild(kind: str, schema: type[P]) -> Callable[[Callable[[nn.Module, P], nn.Module]],
                                                           Callable[[nn.Module, P], nn.Module]]:
    """Decorator: ``fn(model, payload) -> model`` replays a recorded change of type ``kind``.

    ``schema`` types the payload; ``fn`` gets it parsed and raises ``ValueError`` (one line, naming
    the payload field) when the payload does not fit the model.
    """

    def deco(fn: Callable[[nn.Module, P], nn.Module]) -> Callable[[nn.Module, P], nn.Module]:
        if kind in _REBUILDERS:
            raise ValueError(f"a rebuild for structure kind '{kind}' is already registered")
        _REBUILDERS[kind] = _Rebuilder(fn, schema)
        return fn

    return deco


def _hook_registrar(table: dict[str, Any], kind: str, what: str) -> Callable[[Any], Any]:
    def deco(fn: Any) -> Any:
        if kind not in _REBUILDERS:
            raise ValueError(f"structure kind '{kind}' has no rebuild registered; register it before its {what} hook")
        if kind in table:
            raise ValueError(f"a {what} hook for structure kind '{kind}' is already registered")
        table[kind] = fn
        return fn

    return deco


def register_verify(kind: str) -> Callable[[Callable[[nn.Module, str], None]], Callable[[nn.Module, str], None]]:
    """Decorator: ``fn(model, source)`` checks a loaded model carrying ``kind`` (its weights against its structure).

    ``fn`` raises :class:`~compress.errors.CheckpointError` naming ``source`` when they disagree.
    """
    return _hook_registrar(_VERIFIERS, kind, "verify")


def register_callbacks(kind: str) -> Callable[[Callable[[nn.Module], Sequence[Callback]]],
                                              Callable[[nn.Module], Sequence[Callback]]]:
    """Decorator: ``fn(model) -> callbacks`` that keep a ``kind`` structure intact while the model trains."""
    return _hook_registrar(_CALLBACKS, kind, "callbacks")


def register_enforce(kind: str) -> Callable[[Callable[[nn.Module], None]], Callable[[nn.Module], None]]:
    """Decorator: ``fn(model)`` (re)installs the hooks by which ``model`` keeps its ``kind`` structure in any loop."""
    return _hook_registrar(_ENFORCERS, kind, "enforce")


def has(model: nn.Module, kind: str) -> bool:
    """Whether ``model``'s recorded structure holds a change of ``kind``."""
    origin = origin_of(model)
    return origin is not None and any(entry.get("kind") == kind for entry in origin.structure)


def verify(model: nn.Module, source: str) -> None:
    """Run the verify hook of every kind ``model`` carries (after a checkpoint's state_dict is loaded).

    Raises:
        CheckpointError: a kind's check failed (one line naming ``source``).
    """
    for kind, fn in _VERIFIERS.items():
        if has(model, kind):
            fn(model, source)


def enforce(model: nn.Module) -> None:
    """Reinstall the in-model hooks of every kind ``model`` carries (after its modules were replaced or rewritten)."""
    for kind, fn in _ENFORCERS.items():
        if has(model, kind):
            fn(model)


def callbacks(model: nn.Module) -> list[Callback]:
    """The training callbacks that keep ``model``'s recorded structure (in kind registration order)."""
    return [cb for kind, fn in _CALLBACKS.items() if has(model, kind) for cb in fn(model)]


def origin_of(model: nn.Module) -> Origin | None:
    return model.__dict__.get(_ATTR)


def set_origin(model: nn.Module, origin: Origin) -> None:
    model.__dict__[_ATTR] = origin
    if isinstance(model, fx.GraphModule):  # its __deepcopy__ rebuilds it from the graph, keeping only these
        model.meta.setdefault(PRESERVED, {})[_ATTR] = origin


def record(model: nn.Module, kind: str, payload: dict[str, Any]) -> None:
    """Append a structural change to the model's origin. A model compress did not build gets an origin
    with no factory (``compress.restore`` applies its checkpoint onto a model the user builds)."""
    origin = origin_of(model)
    if origin is None:
        origin = Origin(factory="")
        set_origin(model, origin)
    origin.structure.append({"kind": kind, "payload": payload})


def field_path(data: Any, error: Mapping[str, Any]) -> str:
    """Where a pydantic error is, as keys of ``data``: ``modules.fc.shapes.weight[0]``.

    Pydantic's ``loc`` also names union members (``constrained-int``); only keys and indexes that are in
    ``data`` are kept, and a missing key at the end.
    """
    out, value, loc = "", data, list(error["loc"])
    for i, part in enumerate(loc):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            value = value[part]
        elif not (i == len(loc) - 1 and error["type"] == "missing"):
            continue
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".")


def parse(structure: object, source: str) -> list[Change]:
    """Check a checkpoint's ``structure`` field: a list of ``{kind, payload}`` of known kinds and types.

    Raises:
        CheckpointError: one line naming ``source`` and the bad field.
    """
    if not isinstance(structure, list):
        raise CheckpointError(f"checkpoint {source}: field 'structure' is of type {type(structure).__name__}, expected a list")
    changes = []
    for i, entry in enumerate(structure):
        where = f"checkpoint {source}: field 'structure[{i}]'"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where} is of type {type(entry).__name__}, expected a dict with 'kind' and 'payload'")
        extra = sorted(map(str, set(entry) - {"kind", "payload"}))
        if extra or "payload" not in entry:
            raise CheckpointError(f"{where}: " + (f"unknown key '{extra[0]}'" if extra else "missing 'payload'")
                                  + " (expected keys: kind, payload)")
        kind = entry.get("kind")
        if not isinstance(kind, str) or kind not in _REBUILDERS:
            raise CheckpointError(f"{where}: kind {kind!r} is not a structural change this compress can rebuild "
                                  f"(known: {', '.join(sorted(_REBUILDERS))})")
        try:
            payload = _REBUILDERS[kind].schema.model_validate(entry["payload"])
        except ValidationError as exc:
            err = exc.errors()[0]
            path = field_path(entry, {**err, "loc": ("payload", *err["loc"])})
            raise CheckpointError(f"checkpoint {source}: field 'structure[{i}].{path}' ({kind}): {err['msg']}") from None
        changes.append(Change(kind, payload))
    return changes


def replay(model: nn.Module, changes: Sequence[Change], source: str) -> nn.Module:
    """Replay parsed changes (:func:`parse`) onto a freshly built factory model.

    Raises:
        CheckpointError: a change does not fit the model (one line naming ``source`` and the field).
    """
    for i, change in enumerate(changes):
        where = f"checkpoint {source}: field 'structure[{i}].payload' ({change.kind})"
        try:
            model = _REBUILDERS[change.kind].fn(model, change.payload)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError, RuntimeError) as exc:
            # ValueError is the rebuild's own one-line refusal; the others mean a payload that passed the
            # schema still does not fit this model: bad input either way, never a traceback.
            raise CheckpointError(f"{where}: {one_line(str(exc)) if isinstance(exc, ValueError) else first_line(exc)}") from None
    return model
