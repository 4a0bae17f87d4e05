"""Quantization units: the quantizers that go in or out of INT8 together, and a switch to run with some of them.

A sensitivity analysis or an accuracy-budget search asks "what if only this layer were INT8" (or float).
What "this layer" is depends on how :func:`compress.quant.prepare` placed the quantizers:

- ``layer``: a quantized Conv/Linear: its weight quantizer and its own input quantizer, plus (in a
  ``torch.fx`` model) the graph quantizers every user of which is this layer (ONNX Runtime quantizes a
  tensor at its producer: a tensor only this layer reads is its input quantizer in all but name);
- ``attention``: the four attention-MatMul quantizers of one ``nn.MultiheadAttention`` rewrite or one
  ``F.scaled_dot_product_attention`` site (``sdpa_quant``);
- ``graph``: the other graph quantizers: a residual add's inputs (one unit per add, TensorRT) or a tensor
  several ops share (ONNX Runtime), which quantizes for all of them at once.

Every enabled quantizer belongs to exactly one unit, so with every unit float the model is its float model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum

from torch import fx, nn

from compress.quant import graph
from compress.quant.attention import QuantMultiheadAttention
from compress.quant.layers import QuantLayer
from compress.quant.quantizer import TensorQuantizer
from compress.quant.sdpa import AttentionQuantizers


class UnitKind(str, Enum):
    layer = "layer"
    attention = "attention"
    graph = "graph"


@dataclass(frozen=True)
class Unit:
    """Quantizers switched together.

    Attributes:
        name: the layer's, attention module's or graph quantizer's module name (an add's: ``act_quant.add``).
        kind: see the module docstring.
        quantizers: module names of its quantizers.
        module: the module whose MACs it quantizes (``None`` for graph units: no matmul of their own).
    """

    name: str
    kind: UnitKind
    quantizers: tuple[str, ...]
    module: str | None


_ADD_INPUT = re.compile(r"_in\d+$")  # TensorRT's residual-add input quantizers: act_quant.<add>_in<i>


def _own(prefix: str, module: nn.Module) -> tuple[str, ...]:
    return tuple(f"{prefix}.{n}" if prefix else n for n, m in module.named_children() if isinstance(m, TensorQuantizer))


def _graph_owner(model: fx.GraphModule) -> dict[str, str]:
    """Graph quantizer -> the quantized layer that is its only user (where there is one)."""
    owners: dict[str, str] = {}
    for node in model.graph.nodes:
        if node.op != "call_module" or not str(node.target).startswith(graph.CONTAINER + "."):
            continue
        users = {str(u.target) for u in node.users if u.op == "call_module"}
        if len(users) == 1 and len(node.users) >= 1 and all(u.op == "call_module" for u in node.users):
            (user,) = users
            if isinstance(model.get_submodule(user), QuantLayer):
                owners[str(node.target)] = user
    return owners


def units(model: nn.Module) -> list[Unit]:
    """The model's quantization units, in module order, each holding at least one enabled quantizer.

    Quantizers already disabled (a layer kept float by :func:`compress.quant.keep_float`) are left out; a unit
    with none enabled is not listed.
    """
    owners = _graph_owner(model) if isinstance(model, fx.GraphModule) else {}
    attached: dict[str, list[str]] = {}
    for q, layer in owners.items():
        attached.setdefault(layer, []).append(q)
    found: list[Unit] = []
    graph_groups: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLayer):
            found.append(Unit(name, UnitKind.layer, (*_own(name, module), *attached.get(name, [])), name))
        elif isinstance(module, (QuantMultiheadAttention, AttentionQuantizers)):
            found.append(Unit(name, UnitKind.attention, _own(name, module), name))
        elif isinstance(module, TensorQuantizer) and name.startswith(graph.CONTAINER + ".") and name not in owners:
            graph_groups.setdefault(_ADD_INPUT.sub("", name), []).append(name)
    found += [Unit(group, UnitKind.graph, tuple(names), None) for group, names in graph_groups.items()]
    qs = dict(_quantizers(model))
    kept = []
    for unit in found:
        enabled = tuple(q for q in unit.quantizers if qs[q].quant_enabled)
        if enabled:
            kept.append(Unit(unit.name, unit.kind, enabled, unit.module))
    return kept


def _quantizers(model: nn.Module) -> Iterator[tuple[str, TensorQuantizer]]:
    for name, m in model.named_modules():
        if isinstance(m, TensorQuantizer):
            yield name, m


@contextmanager
def quantizing(model: nn.Module, int8: Iterable[Unit], all_units: Iterable[Unit]) -> Iterator[None]:
    """Run with only the quantizers of ``int8`` enabled among those of ``all_units`` (the others float);
    every quantizer's own setting is restored on exit."""
    qs = dict(_quantizers(model))
    on = {q for unit in int8 for q in unit.quantizers}
    all_units = list(all_units)
    switched = [qs[q] for unit in all_units for q in unit.quantizers]
    saved = [q.quant_enabled for q in switched]
    try:
        for unit in all_units:
            for q in unit.quantizers:
                qs[q].quant_enabled = q in on
        yield
    finally:
        for q, state in zip(switched, saved, strict=True):
            q.quant_enabled = state
