"""Quantizers on graph values the layers cannot see: residual adds, concatenations, pooling.

Uses ``torch.fx`` on the model. Placement follows the target:

- ``tensorrt``: a quantizer on every input of a residual add except the one coming straight from a
  Conv(+BatchNorm), which TensorRT fuses with the add (its "quantize the residual input" rule).
  Conv/Gemm inputs are quantized by the layers themselves; pooling and concat commute with Q/DQ in
  TensorRT, so they get none.
- ``onnxruntime``: one quantizer per tensor (shared by all its consumers) on the inputs of every
  quantized layer, add, concat and pooling op, and on pooling outputs. Quantizing at the producer
  gives ONNX Runtime the ``DQ -> op -> Q`` groups it fuses into QLinear* kernels.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from compress.attention import scaled_dot_product_attention as late_sdpa
from compress.quant.layers import BATCHNORMS, QuantLayer
from compress.quant.quantizer import TensorQuantizer
from compress.quant.spec import QuantSpec, Target

CONTAINER = "act_quant"

_ADDS = {operator.add, operator.iadd, torch.add}
_CATS = {torch.cat, torch.concat}
_POOL_FNS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
             F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d}
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_NON_TENSOR_METHODS = {"size", "dim", "numel", "item", "tolist"}


class Tracer(fx.Tracer):
    """Keeps quantized layers and quantizers as leaves (their forward has data-dependent checks)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantLayer, TensorQuantizer)) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx`` trace keeping the module hierarchy (state_dict keys unchanged); ``F.scaled_dot_product_attention``
    calls go through :func:`compress.attention.scaled_dot_product_attention`.

    Raises:
        Exception: whatever fx raises for a model with data-dependent control flow.
    """
    graph = Tracer().trace(model)
    for node in graph.nodes:  # SDPA called at run time through F, so the export's explicit attention reaches it
        if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
            node.target = late_sdpa
    return fx.GraphModule(model, graph, model.__class__.__name__)


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def _is_tensor(node: object) -> bool:
    """Whether a traced value is a tensor (not a shape, size or number derived from one)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op in ("placeholder", "call_module", "get_attr"):
        return True
    if node.op == "call_method":
        return node.target not in _NON_TENSOR_METHODS and _is_tensor(node.args[0])
    if node.op == "call_function":
        if node.target in (getattr, len):
            return False
        inputs = [a for a in node.args if isinstance(a, fx.Node)]
        for a in node.args:
            if isinstance(a, (list, tuple)):
                inputs += [b for b in a if isinstance(b, fx.Node)]
        return any(_is_tensor(a) for a in inputs) if inputs else False
    return False


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    args = node.args[0] if node.op == "call_function" and node.target in _CATS else node.args
    return [a for a in (args if isinstance(args, (list, tuple)) else [args]) if _is_tensor(a)]


def is_add(node: fx.Node) -> bool:
    hit = (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )
    return hit and len([a for a in node.args[:2] if _is_tensor(a)]) == 2


def is_cat(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _CATS


def is_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _POOL_FNS) or isinstance(_module(gm, node), _POOL_MODULES)


def is_quant_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(_module(gm, node), QuantLayer)


def _from_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    """The node is a quantized Conv/Linear output, possibly through a BatchNorm (single users)."""
    if isinstance(_module(gm, node), BATCHNORMS) and isinstance(node.args[0], fx.Node):
        if len(node.users) != 1:
            return False
        node = node.args[0]
    return is_quant_layer(gm, node) and len(node.users) == 1


def _add_quantizer(gm: fx.GraphModule, name: str, spec: QuantSpec) -> str:
    target = f"{CONTAINER}.{name}"
    gm.add_submodule(target, TensorQuantizer(spec, name=target))
    return target


def _insert_edge(gm: fx.GraphModule, value: fx.Node, consumer: fx.Node, name: str, spec: QuantSpec) -> None:
    target = _add_quantizer(gm, name, spec)
    with gm.graph.inserting_before(consumer):
        q = gm.graph.call_module(target, (value,))
    consumer.replace_input_with(value, q)


def _insert_value(gm: fx.GraphModule, value: fx.Node, name: str, spec: QuantSpec) -> None:
    target = _add_quantizer(gm, name, spec)
    users = [u for u in value.users if u.op != "output"]  # what the model returns stays float
    with gm.graph.inserting_after(value):
        q = gm.graph.call_module(target, (value,))
    for user in users:
        user.replace_input_with(value, q)


def place(gm: fx.GraphModule, target: Target, spec: QuantSpec, keep: Callable[[str], bool]) -> list[str]:
    """Insert the target's graph-level quantizers into ``gm``; returns their module names.

    Args:
        keep: filter on quantizer names (``act_quant.<node>``) from the recipe's include/exclude.
    """
    placer = _place_tensorrt if target is Target.tensorrt else _place_onnxruntime
    names = placer(gm, spec, keep)
    gm.graph.lint()
    gm.recompile()
    return names


def _place_tensorrt(gm: fx.GraphModule, spec: QuantSpec, keep: Callable[[str], bool]) -> list[str]:
    names = []
    for node in list(gm.graph.nodes):
        if not is_add(node):
            continue
        inputs = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        fused = next((a for a in inputs if _from_conv(gm, a)), None)
        for i, value in enumerate(inputs):
            name = f"{node.name}_in{i}"
            if i and value is inputs[0]:
                continue  # x + x: the first quantizer already feeds both inputs
            if value is not fused and keep(f"{CONTAINER}.{name}"):
                _insert_edge(gm, value, node, name, spec)
                names.append(f"{CONTAINER}.{name}")
    return names


def _is_passthrough(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Returns its input unchanged (in eval): quantizing the input quantizes this output too."""
    if node.op == "call_method":
        return node.target == "contiguous"
    if node.op == "call_function":
        return node.target is F.dropout
    return isinstance(_module(gm, node), (nn.Dropout, nn.Identity))


def _producer_value(gm: fx.GraphModule, value: fx.Node) -> fx.Node:
    """Walk back through ops that return their input unchanged, so one Q serves the tensor.

    Reshapes (flatten before a Linear) keep their own quantizer: it calibrates to the same range,
    and ONNX Runtime needs the DequantizeLinear directly in front of the Gemm it fuses.
    """
    while _is_passthrough(gm, value) and value.args and isinstance(value.args[0], fx.Node):
        value = value.args[0]
    return value


def _place_onnxruntime(gm: fx.GraphModule, spec: QuantSpec, keep: Callable[[str], bool]) -> list[str]:
    values: dict[fx.Node, None] = {}  # ordered set
    for node in list(gm.graph.nodes):
        if is_quant_layer(gm, node):
            inputs: Iterable[fx.Node] = [a for a in node.args[:1] if isinstance(a, fx.Node)]
        elif is_add(node) or is_cat(node):
            inputs = _tensor_args(node)
        elif is_pool(gm, node):
            inputs = [*_tensor_args(node)[:1], node]
        else:
            continue
        for value in inputs:
            values[_producer_value(gm, value)] = None
    names = []
    for value in values:
        name = f"{value.name}_out"
        if keep(f"{CONTAINER}.{name}"):
            _insert_value(gm, value, name, spec)
            names.append(f"{CONTAINER}.{name}")
    return names
