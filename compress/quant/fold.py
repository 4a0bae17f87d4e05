"""Fold BatchNorm into the preceding (quantized) convolution, exactly, for export.

With per-output-channel weight scales, folding is exact in fake-quant terms: for a BN factor
``f = gamma / sqrt(var + eps)`` per channel, ``q(w * f; amax * |f|) == f * q(w; amax)``. So the
exported graph computes what the fake-quant model with BatchNorm computes, and engines (which
want weights already folded) see one Conv with int8 weights.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from compress.quant import graph
from compress.quant.layers import BATCHNORMS, QuantLayer, follow_weight

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@torch.no_grad()
def _fold_into(conv: nn.Module, bn: nn.Module) -> None:
    std = torch.sqrt(bn.running_var + bn.eps)
    factor = (bn.weight if bn.affine else torch.ones_like(std)) / std
    shift = (bn.bias if bn.affine else torch.zeros_like(std)) - bn.running_mean * factor
    shape = [-1] + [1] * (conv.weight.ndim - 1)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(std)
    conv.weight.copy_(conv.weight * factor.reshape(shape))
    new_bias = bias * factor + shift
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias)
    else:
        conv.bias.copy_(new_bias)
    if isinstance(conv, QuantLayer) and conv.weight_quantizer.calibrated:
        follow_weight(conv)  # the range of the folded weight (also when the weight moved since its range was set)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (in eval mode) with every Conv -> BatchNorm pair folded into the Conv.

    Models that ``torch.fx`` cannot trace are returned copied but unfolded (the BatchNorm then
    stays in the exported graph).
    """
    work = copy.deepcopy(model).eval()
    if not isinstance(work, fx.GraphModule):
        try:
            work = graph.trace(work)
        except Exception:  # untraceable: export it as it is
            return work
    changed = False
    for node in list(work.graph.nodes):
        if node.op != "call_module" or not isinstance(work.get_submodule(str(node.target)), BATCHNORMS):
            continue
        source = node.args[0]
        if not (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue
        conv = work.get_submodule(str(source.target))
        bn = work.get_submodule(str(node.target))
        if not isinstance(conv, _CONVS) or bn.running_var is None:
            continue
        _fold_into(conv, bn)
        node.replace_all_uses_with(source)
        work.graph.erase_node(node)
        changed = True
    if changed:
        work.graph.lint()
        work.delete_all_unused_submodules()
        work.recompile()
    return work
