"""The pruning plan a checkpoint stores: new shapes and sizes per module, replayed onto the factory model.

After channel pruning only shapes differ from the factory model; the values come from the state_dict.
So the plan is, per changed module, its changed integer attributes (``out_channels``, ``groups``,
``num_features``, ``in_features``...) and the new shape of each of its own parameters and buffers.
Replaying it needs neither Torch-Pruning nor pickle.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import Field
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


class ModuleChange(structure.Payload):
    """One module's recorded sizes: changed integer attributes and new parameter/buffer shapes."""

    attrs: dict[str, Annotated[int, Field(ge=1)] | list[Annotated[int, Field(ge=1)]]] = {}
    shapes: dict[str, list[Annotated[int, Field(ge=1)]]] = {}


class PrunePlan(structure.Payload):
    """The ``prune_channels`` payload: ``{"modules": {name: ModuleChange}}``."""

    modules: dict[str, ModuleChange]


@structure.register_rebuild(KIND, PrunePlan)
def _rebuild(model: nn.Module, payload: PrunePlan) -> nn.Module:
    apply(model, {name: change.model_dump() for name, change in payload.modules.items()})
    return model


def _shrinks(new: int | list[int], old: Any) -> bool:
    """``new`` has ``old``'s form (an int, or a list/tuple as long) and is no larger anywhere."""
    if isinstance(new, int):
        return isinstance(old, int) and not isinstance(old, bool) and new <= old
    return isinstance(old, (tuple, list)) and len(old) == len(new) and all(
        isinstance(o, int) and n <= o for n, o in zip(new, old, strict=True))


def check(model: nn.Module, modules: dict[str, dict[str, Any]]) -> None:
    """A plan fits ``model``: it names existing modules, their own size attributes and tensors, and only
    shrinks them (pruning never grows a module), so replaying it allocates no more than the model has.

    Raises:
        CheckpointError: one line naming the module and field that do not fit.
    """
    for name, change in modules.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"modules.{name}: the pruning plan resizes module '{name}', which the factory "
                             "model lacks") from None
        sizes = _attrs(module)
        for key, value in change.get("attrs", {}).items():
            if key not in sizes:
                raise CheckpointError(f"modules.{name}.attrs.{key}: '{key}' is not a size attribute of "
                                 f"{type(module).__name__} '{name}' (sizes: {', '.join(sorted(sizes)) or 'none'})")
            if not _shrinks(value, getattr(module, key)):
                raise CheckpointError(f"modules.{name}.attrs.{key}: {value} does not fit {type(module).__name__} '{name}' "
                                 f"whose {key} is {list(sizes[key]) if isinstance(sizes[key], list) else sizes[key]} "
                                 "(pruning only shrinks)")
        tensors = _tensors(module)
        for key, shape in change.get("shapes", {}).items():
            if key not in tensors:
                raise CheckpointError(f"modules.{name}.shapes.{key}: the pruning plan resizes '{name}.{key}', which the "
                                 f"factory model lacks (its tensors: {', '.join(sorted(tensors)) or 'none'})")
            if not _shrinks(shape, tensors[key]):
                raise CheckpointError(f"modules.{name}.shapes.{key}: shape {shape} does not fit '{name}.{key}' of shape "
                                 f"{tensors[key]} (pruning only shrinks)")


@torch.no_grad()
def apply(model: nn.Module, modules: dict[str, dict[str, Any]]) -> None:
    """Resize ``model``'s modules to the recorded shapes (values zero, to be filled by a state_dict).

    Raises:
        CheckpointError: the plan names a module, attribute or tensor the factory model does not have, or a
            size larger than it (see :func:`check`); nothing is changed then.
    """
    check(model, modules)
    for name, change in modules.items():
        module = model.get_submodule(name)
        for key, value in change.get("attrs", {}).items():
            old = getattr(module, key, None)
            setattr(module, key, tuple(value) if isinstance(old, tuple) else value)
        for key, shape in change.get("shapes", {}).items():
            old = getattr(module, key)
            new = torch.zeros(shape, dtype=old.dtype, device=old.device)
            if isinstance(old, nn.Parameter):
                setattr(module, key, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                module._buffers[key] = new
