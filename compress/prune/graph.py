"""Coupled channel groups from Torch-Pruning's dependency graph (the surgery engine under ``channel``).

A group is every tensor slice that must lose the same channels together: a conv's filters, its
BatchNorm, the next layers' input channels, and across residual adds / concatenations / depthwise
convs all the layers tied to them. Torch-Pruning traces these through autograd; compress decides
which channels go (``compress.prune.channel``) and records the resulting shapes (``plan.py``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress.errors import CompressError, first_line
from compress.inputs import call_model
from compress.prune.heads import Attention, Layout, attention_of

ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass
class Group:
    """One set of coupled output channels.

    Attributes:
        root: the layer whose output channels define the group.
        layers: every Conv/Linear whose output channels are in the group (the root first).
        channels: current output channels of the root.
        ch_groups: >1 for grouped convs: the same positions go in each of the conv's groups.
        tp_group: Torch-Pruning's group (all channels), for importance scores.
    """

    root: str
    layers: list[str]
    channels: int
    ch_groups: int
    tp_group: Any
    unsupported: str | None = None  # why the group cannot be pruned safely
    attention: Attention | None = None  # the attention modules whose heads the group's channels form

    @property
    def units(self) -> int:
        """Channels that can be chosen independently (per conv group)."""
        return self.channels // self.ch_groups


@dataclass
class Traced:
    """The dependency graph and what one forward showed: layers it ran and layers that produce the output."""

    dg: Any
    output_layers: set[str]
    lost: list[str]  # layers forward ran that the graph does not reach: their output left autograd


def trace(model: nn.Module, example: torch.Tensor, where: str) -> Traced:
    """Trace ``model`` on ``example`` into a dependency graph.

    Raises:
        CompressError: forward fails on ``example``, or the tracer fails.
    """
    import torch_pruning as tp

    ran, outputs = _run_layers(model, example, where)
    was_training = model.training
    model.eval()
    frozen = [p for p in model.parameters() if not p.requires_grad]
    try:  # the tracer follows autograd: trace with gradients on, also for frozen or no_grad callers
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")
            for p in frozen:
                p.requires_grad_(True)
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    except Exception as exc:  # the tracer raises many types on Python it cannot follow
        raise CompressError(f"{where}: the dependency tracer cannot follow the model: {first_line(exc)}") from None
    finally:
        model.train(was_training)
        for p in frozen:
            p.requires_grad_(False)
    seen = {m for m in dg.module2node}
    names = {m: n for n, m in model.named_modules()}
    outputs |= {names[m] for m in _reaching_output(dg) if m in names}
    return Traced(dg, outputs, [name for name in ran if model.get_submodule(name) not in seen])


def _reaching_output(dg: Any) -> set[nn.Module]:
    """Conv/Linear modules whose output reaches the model's output through no other Conv/Linear
    (e.g. ``fc(x) * 2`` or ``conv(x).flatten(1)``): their channels are the model's output."""
    found = set()
    for module, node in dg.module2node.items():
        if not isinstance(module, ROOT_TYPES):
            continue
        stack, visited = list(node.outputs), set()
        while stack:
            nxt = stack.pop()
            if id(nxt) in visited or isinstance(nxt.module, ROOT_TYPES):
                continue
            visited.add(id(nxt))
            if not nxt.outputs:
                found.add(module)
                break
            stack.extend(nxt.outputs)
        else:
            if not node.outputs:
                found.add(module)
    return found


@torch.no_grad()
def _run_layers(model: nn.Module, example: torch.Tensor, where: str) -> tuple[list[str], set[str]]:
    """Conv/Linear layers one forward runs (in order), and those whose output is the model's output."""
    produced: list[tuple[Any, str]] = []  # holding the outputs keeps their ids from being reused
    ran: list[str] = []

    def hook(_mod: nn.Module, _inputs: Any, out: Any, name: str) -> None:
        produced.append((out, name))
        if name not in ran:
            ran.append(name)

    handles = [
        m.register_forward_hook(lambda mod, i, out, name=name: hook(mod, i, out, name))
        for name, m in model.named_modules() if isinstance(m, ROOT_TYPES) and name
    ]
    was_training = model.training
    model.eval()
    try:
        out = call_model(model, example)
    except Exception as exc:  # a user's forward can raise anything
        raise CompressError(f"{where}: the model's forward fails on the example input: {first_line(exc)}") from None
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    values = list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, (tuple, list)) else [out]
    return ran, {name for tensor, name in produced if any(tensor is v for v in values)}


def groups(dg: Any, model: nn.Module) -> list[Group]:
    """Every coupled output-channel group of ``model`` rooted at a Conv/Linear."""
    names = {m: n for n, m in model.named_modules()}
    found = []
    for tp_group in dg.get_all_groups(ignored_layers=[], root_module_types=ROOT_TYPES):
        root = tp_group[0].dep.target.module
        channels = dg.get_out_channels(root)
        layers, ch_groups, unsupported = [], 1, None
        for dep, _idxs in tp_group:
            module = dep.target.module
            out_fn = dg.is_out_channel_pruning_fn(dep.handler)
            if out_fn and isinstance(module, ROOT_TYPES) and names.get(module) not in layers:
                layers.append(names.get(module, "?"))
            pruner = dg.get_pruner_of_module(module)
            if pruner is None or (isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.out_channels):
                continue  # depthwise convs tie input to output channels one to one: no extra constraint
            split = pruner.get_out_channel_groups(module) if out_fn else pruner.get_in_channel_groups(module)
            if (split or 1) > 1:
                seen = dg.get_out_channels(module) if out_fn else dg.get_in_channels(module)
                if seen != channels:  # e.g. a concatenation feeds a grouped conv: group positions differ
                    unsupported = f"grouped layer '{names.get(module, '?')}' sees these channels among others"
            ch_groups = max(ch_groups, split or 1)
        attention, why = attention_of(tp_group, names, model, channels)
        if attention is not None and attention.layout is Layout.mha:  # out_proj is pruned by the MHA's own pruner
            layers += [f"{name}.out_proj" for name in attention.names if f"{name}.out_proj" not in layers]
        found.append(Group(names[root], layers, channels, ch_groups, tp_group, unsupported or why, attention))
    return found
