"""Run a few in-place updates outside a TorchScript trace.

The model keeps its own invariants in forward pre-hooks (2:4 masks re-applied, weight quantizer ranges
following the weights). When ``torch.onnx.export`` traces the model those updates must not become graph
nodes: the weights have to stay plain initializers that the TensorRT rules checker and ``verify_onnx``
read. :func:`outside_trace` pauses the tracer for the update and restores it in ``finally``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def outside_trace() -> Iterator[None]:
    """Pause TorchScript tracing (a no-op when not tracing); gradients off, as for any in-place weight fix."""
    state = torch._C._get_tracing_state() if torch.jit.is_tracing() else None
    if state is not None:
        torch._C._set_tracing_state(None)
    try:
        with torch.no_grad():
            yield
    finally:
        if state is not None:
            torch._C._set_tracing_state(state)


def changed_since(tensor: torch.Tensor, seen: tuple[int, int] | None) -> bool:
    """Whether ``tensor`` is another tensor than, or was written in place since, the ``seen`` stamp.

    A stamp is ``(id, version)`` (:func:`stamp`): an optimizer step or ``load_state_dict`` bumps the
    version, a deep copy makes a new tensor. Writes through ``.data`` bump nothing: they go unseen.
    """
    return seen != stamp(tensor)


def stamp(tensor: torch.Tensor) -> tuple[int, int]:
    return id(tensor), tensor._version
