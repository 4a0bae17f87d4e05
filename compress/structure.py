"""Structural changes recorded on a model so a checkpoint can rebuild it from its factory.

Stages that change a model's architecture (channel pruning, quantizer insertion, sparsity masks)
record a ``(kind, payload)`` entry; loading a checkpoint rebuilds the factory model and replays
the entries in order before loading the state_dict. Payloads hold only tensors, numbers, strings,
lists and dicts, so checkpoints stay loadable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from compress.errors import CheckpointError

Rebuild = Callable[[nn.Module, dict[str, Any]], nn.Module]

_REBUILDERS: dict[str, Rebuild] = {}
_ATTR = "_compress_origin"


@dataclass
class Origin:
    """How a model was built: factory, kwargs, and the structural changes applied since."""

    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    structure: list[dict[str, Any]] = field(default_factory=list)


def register_rebuild(kind: str) -> Callable[[Rebuild], Rebuild]:
    """Decorator: ``fn(model, payload) -> model`` replays a recorded change of type ``kind``."""

    def deco(fn: Rebuild) -> Rebuild:
        _REBUILDERS[kind] = fn
        return fn

    return deco


def origin_of(model: nn.Module) -> Origin | None:
    return model.__dict__.get(_ATTR)


def set_origin(model: nn.Module, origin: Origin) -> None:
    model.__dict__[_ATTR] = origin


def record(model: nn.Module, kind: str, payload: dict[str, Any]) -> None:
    """Append a structural change to the model's origin. A model compress did not build gets an origin
    with no factory, so ``compress.save(model, path, factory=...)`` still stores the change."""
    origin = origin_of(model)
    if origin is None:
        origin = Origin(factory="")
        set_origin(model, origin)
    origin.structure.append({"kind": kind, "payload": payload})


def replay(model: nn.Module, structure: list[dict[str, Any]], source: str) -> nn.Module:
    for entry in structure:
        kind = entry.get("kind")
        if kind not in _REBUILDERS:
            raise CheckpointError(
                f"{source}: records a structural change '{kind}' this version of compress cannot rebuild"
            )
        model = _REBUILDERS[kind](model, entry.get("payload", {}))
    return model
