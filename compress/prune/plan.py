"""The pruning plan a checkpoint stores: new shapes and sizes per module, replayed onto the factory model.

After channel pruning only shapes differ from the factory model; the values come from the state_dict.
So the plan is, per changed module, its changed integer attributes (``out_channels``, ``groups``,
``num_features``, ``in_features``...) and the new shape of each of its own parameters and buffers.
Replaying it needs neither Torch-Pruning nor pickle.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress import structure
from compress.errors import CheckpointError

KIND = "prune_channels"


def _attrs(module: nn.Module) -> dict[str, Any]:
    """A module's public integer (or tuple-of-int) attributes: its sizes."""

    def is_size(v: Any) -> bool:
        if isinstance(v, bool):
            return False
        if isinstance(v, int):
            return True
        return isinstance(v, (tuple, list)) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(module).items()
            if not k.startswith("_") and is_size(v)}


def _tensors(module: nn.Module) -> dict[str, list[int]]:
    own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
    return {k: list(t.shape) for k, t in own if t is not None}


def snapshot(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Sizes of every module, to diff against after pruning."""
    return {name: {"attrs": _attrs(m), "shapes": _tensors(m)} for name, m in model.named_modules()}


def changes(before: dict[str, dict[str, Any]], model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module: {"attrs": {...}, "shapes": {...}}}`` for what differs from ``before``."""
    now = snapshot(model)
    diff = {}
    for name, state in now.items():
        old = before.get(name, {"attrs": {}, "shapes": {}})
        attrs = {k: v for k, v in state["attrs"].items() if old["attrs"].get(k) != v}
        shapes = {k: v for k, v in state["shapes"].items() if old["shapes"].get(k) != v}
        if attrs or shapes:
            diff[name] = {"attrs": attrs, "shapes": shapes}
    return diff


def record(model: nn.Module, before: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Store the shape changes since ``before`` in the model's origin; returns them."""
    diff = changes(before, model)
    if diff:
        structure.record(model, KIND, {"modules": diff})
    return diff


@structure.register_rebuild(KIND)
def _rebuild(model: nn.Module, payload: dict[str, Any]) -> nn.Module:
    apply(model, payload["modules"])
    return model


@torch.no_grad()
def apply(model: nn.Module, modules: dict[str, dict[str, Any]]) -> None:
    """Resize ``model``'s modules to the recorded shapes (values zero, to be filled by a state_dict).

    Raises:
        CheckpointError: the plan names a module or tensor the factory model does not have.
    """
    for name, change in modules.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"the pruning plan resizes module '{name}', which the factory model lacks") from None
        for key, value in change.get("attrs", {}).items():
            old = getattr(module, key, None)
            setattr(module, key, tuple(value) if isinstance(old, tuple) else value)
        for key, shape in change.get("shapes", {}).items():
            old = getattr(module, key, None)
            if not isinstance(old, torch.Tensor):
                raise CheckpointError(f"the pruning plan resizes '{name}.{key}', which the factory model lacks")
            new = torch.zeros(shape, dtype=old.dtype, device=old.device)
            if isinstance(old, nn.Parameter):
                setattr(module, key, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                module._buffers[key] = new
