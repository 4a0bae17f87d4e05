"""The target at export time: a model quantized for one target, re-placed for the other.

What depends on the target is where activation quantizers sit (TensorRT: at each Conv/Gemm input and on
residual adds' non-fused inputs; ONNX Runtime: once per tensor at its producer, also around concat and
pooling) and how activations are stored (int8 symmetric vs uint8). The float model under the quantizers,
the weights and their ranges (max |w|) do not. So :func:`retarget` takes the float model out of a quantized
one, prepares it for the other target with the same options, and gives every new activation quantizer the
range already calibrated (or trained) for the same tensor:

- a tensor quantized under both placements keeps its range (the widest, when several quantizers saw it);
- a pooling output, a flatten/reshape and a concat only ONNX Runtime quantizes take the range of their
  input(s): max and average pooling and reshapes never widen a range, a concat's is its inputs' widest;
- a tensor no quantizer of the model saw (TensorRT fuses a Conv(+BN) into the residual add it feeds, so
  it never quantizes that branch; ONNX Runtime does) takes the max |x| seen on ``data``, the one case that
  needs calibration batches (without them the error names those tensors).

The activation rounding changes with the storage type (127 vs 255 levels), so the other target's outputs
are close to, not bit-equal with, the model's; ``compress check`` measures the engine as always. Models
whose attention is quantized (their quantizers live inside the attention modules) are not re-placed.
"""

from __future__ import annotations

import copy
import operator
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from compress import structure
from compress.data import split_batch
from compress.errors import CompressError
from compress.inputs import call_model, move_inputs
from compress.quant import graph
from compress.quant.attention import QuantMultiheadAttention
from compress.quant.insert import (
    _PRESERVED,
    _TARGET_ATTR,
    QuantConfig,
    QuantRecord,
    _apply,
    _set_module,
    quant_layers,
    quantizers,
    refresh_weight_amax,
    target_of,
    to_target,
)
from compress.quant.layers import _RANGE_OF, QUANT_LAYERS
from compress.quant.quantizer import TensorQuantizer
from compress.quant.sdpa import AttentionQuantizers
from compress.quant.spec import Target

_FLOAT_OF = {quant: float_ for float_, quant in QUANT_LAYERS.items()}
_RESHAPES = {torch.flatten, torch.reshape, operator.getitem}
_RESHAPE_METHODS = {"flatten", "view", "reshape"}


def retarget(model: nn.Module, target: Target | str, data: Iterable[Any] | None = None) -> nn.Module:
    """A copy of the quantized ``model`` placed and typed for ``target`` (``model`` itself when it already is).

    Args:
        data: calibration batches (a DataLoader), used only for tensors no quantizer of ``model`` saw.

    Raises:
        CompressError: the model's attention is quantized, it carries no quantization record, or tensors
            need a range and no ``data`` was given (named).
    """
    target = to_target(target)
    own = target_of(model)
    if own is None or own is target:
        return model
    if any(isinstance(m, (QuantMultiheadAttention, AttentionQuantizers)) for m in model.modules()):
        raise CompressError(f"export: the model's attention is quantized for {own.value}; its quantizers cannot be "
                            f"re-placed for {target.value}: quantize for {target.value}")
    origin = structure.origin_of(model)
    records = [e for e in origin.structure if e.get("kind") == "quant"] if origin else []
    if not records:
        raise CompressError(f"export: the model was quantized for {own.value} by other code (no quantization "
                            f"record); quantize for {target.value} instead")
    record = QuantRecord.model_validate(records[-1]["payload"])
    config = QuantConfig(target, tuple(record.include), tuple(record.exclude), record.graph, record.attention,
                         tuple(record.sites) if record.sites is not None else None)
    ranges = dict(_ranges(model))
    work = _float_copy(model)
    new = _apply(work, config, where="export")
    refresh_weight_amax(new)  # max |w|, as the model's own weight ranges
    unseen = []
    for name, q in quantizers(new):
        if q.spec.axis is not None:
            continue  # weight ranges follow the weights (quant.layers)
        found = _lookup(new, _key(new, name), ranges)
        if found is None:
            unseen.append(name)
        else:
            q.set_amax(found[0], nonneg=found[1])
    if unseen:
        if data is None:
            more = f" (+{len(unseen) - 3} more)" if len(unseen) > 3 else ""
            raise CompressError(f"export: {len(unseen)} tensor(s) the {target.value} placement quantizes were never "
                                f"quantized for {own.value} ({', '.join(unseen[:3])}{more}): pass calibration "
                                f"batches (calibration=loader), or quantize for {target.value}")
        _calibrate(new, [q for n, q in quantizers(new) if n in unseen], data)
    return new.train(model.training)


class _Max:
    """Running max |x| and whether any value was negative (the ``nonneg`` uint8 activations use)."""

    def __init__(self) -> None:
        self.amax: torch.Tensor | None = None
        self.nonneg = True

    def collect(self, x: torch.Tensor) -> None:
        amax = x.detach().abs().amax().float()
        self.amax = amax if self.amax is None else torch.maximum(self.amax, amax)
        self.nonneg = self.nonneg and bool((x >= 0).all())

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


@torch.no_grad()
def _calibrate(model: nn.Module, chosen: list[TensorQuantizer], data: Iterable[Any]) -> None:
    """Max-calibrate ``chosen`` on ``data`` with every other quantizer quantizing (the model as deployed)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seen = {id(q): _Max() for q in chosen}
    try:
        for q in chosen:
            q.calibrator, q.calib_enabled = seen[id(q)], True
        for batch in data:
            call_model(model, move_inputs(split_batch(batch)[0], device))
    finally:
        for q in chosen:
            q.calibrator, q.calib_enabled = None, False
        model.train(was_training)
    for q in chosen:
        cal = seen[id(q)]
        if cal.amax is None:
            raise CompressError(f"export: {q.name} saw no calibration data (the calibration batches were empty)")
        q.set_amax(cal.amax, nonneg=cal.nonneg)


def _float_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with its quantized layers back to their float classes and no quantizers."""
    work = copy.deepcopy(model)
    for name, layer in list(quant_layers(work)):
        cls = _FLOAT_OF[type(layer)]
        plain = cls.__new__(cls)
        plain.__dict__.update({k: v for k, v in layer.__dict__.items() if k != _RANGE_OF})
        plain._modules = OrderedDict((k, m) for k, m in layer._modules.items()
                                     if k not in ("input_quantizer", "weight_quantizer"))
        _set_module(work, name, plain)
    if isinstance(work, fx.GraphModule):
        for node in list(work.graph.nodes):
            if node.op == "call_module" and isinstance(work.get_submodule(str(node.target)), TensorQuantizer):
                node.replace_all_uses_with(node.args[0])
                work.graph.erase_node(node)
        if hasattr(work, graph.CONTAINER):
            delattr(work, graph.CONTAINER)
        work.graph.lint()
        work.recompile()
        for key in (_TARGET_ATTR, "_compress_quant_plan", "_compress_quant_attention"):
            work.meta.get(_PRESERVED, {}).pop(key, None)
    for key in (_TARGET_ATTR, "_compress_quant_plan", "_compress_quant_attention"):
        work.__dict__.pop(key, None)
    origin = structure.origin_of(work)
    if origin is not None:
        origin.structure = [e for e in origin.structure if e.get("kind") != "quant"]
    return work


def _node(gm: fx.GraphModule, module: str) -> fx.Node | None:
    return next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == module), None)


def _key(model: nn.Module, name: str) -> str | fx.Node:
    """What tensor the activation quantizer ``name`` quantizes: its fx value (through quantizers and
    pass-through ops), or, in a model fx could not trace, its layer's name."""
    layer, _, leaf = name.rpartition(".")
    if not isinstance(model, fx.GraphModule):
        return name
    node = _node(model, layer if leaf == "input_quantizer" else name)
    if node is None or not node.args or not isinstance(node.args[0], fx.Node):
        return name
    value = node.args[0]
    while value.op == "call_module" and isinstance(model.get_submodule(str(value.target)), TensorQuantizer):
        value = value.args[0]
    return value


def _value_name(value: str | fx.Node, model: nn.Module) -> str:
    if isinstance(value, str):
        return value
    assert isinstance(model, fx.GraphModule)
    return graph._producer_value(model, value).name


def _ranges(model: nn.Module) -> Iterator[tuple[str, tuple[torch.Tensor, bool]]]:
    """Per tensor (fx value name, or layer name), the widest calibrated range of the quantizers on it."""
    found: dict[str, tuple[torch.Tensor, bool]] = {}
    for name, q in quantizers(model):
        if q.spec.axis is not None or not q.calibrated:
            continue
        key = _value_name(_key(model, name), model)
        amax, nonneg = q.amax.detach().clone(), bool(q.nonneg)
        if key in found:
            amax, nonneg = torch.maximum(amax, found[key][0]), nonneg and found[key][1]
        found[key] = (amax, nonneg)
    return iter(found.items())


def _lookup(model: nn.Module, key: str | fx.Node, ranges: dict[str, tuple[torch.Tensor, bool]],
            depth: int = 0) -> tuple[torch.Tensor, bool] | None:
    """The range for the tensor ``key`` names: its own, or its input's through pooling/reshapes, or a concat's
    inputs' widest."""
    name = _value_name(key, model)
    if name in ranges or isinstance(key, str) or depth > 16:
        return ranges.get(name)
    assert isinstance(model, fx.GraphModule)
    value = graph._producer_value(model, key)
    inputs = [a for a in (value.args[0] if graph.is_cat(value) else value.args[:1]) if isinstance(a, fx.Node)] \
        if value.args else []
    through = graph.is_pool(model, value) or graph.is_cat(value) or _is_reshape(model, value)
    found = [_lookup(model, a, ranges, depth + 1) for a in inputs] if through else []
    if not found or any(f is None for f in found):
        return None
    amax = torch.stack([f[0] for f in found]).amax(0)  # type: ignore[index]
    return amax, all(f[1] for f in found)  # type: ignore[index]


def _is_reshape(model: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _RESHAPE_METHODS
    if node.op == "call_function":
        return node.target in _RESHAPES or node.target is F.dropout
    return isinstance(graph._module(model, node), nn.Flatten)
