"""Attention written out as MatMul/Softmax, and a switch that routes ``F.scaled_dot_product_attention`` to it.

ONNX has no attention op at opset 13, and the TorchScript exporter (``dynamo=False``, the path that gives
opset 13) exports ``aten::scaled_dot_product_attention`` only from opset 14. Models reach it through
``nn.MultiheadAttention`` (``F.multi_head_attention_forward`` calls the module-global
``scaled_dot_product_attention``), Hugging Face ``transformers`` (``attn_implementation="sdpa"``) and timm
(``fused_attn``): all look the function up on ``torch.nn.functional`` at call time, so
:func:`explicit_attention` swaps that one attribute for :func:`attention` while it is active.

:func:`attention` scales Q before Q·Kᵀ (one Mul on the Q side), so each of the two MatMuls takes its
inputs straight from a tensor a DequantizeLinear can produce. Its four MatMul inputs pass through
:class:`AttentionPoints` (identity by default): the place INT8 attention puts its quantizers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 (the name every library uses for it)
from torch import Tensor

Point = Callable[[Tensor], Tensor]


def _same(x: Tensor) -> Tensor:
    return x


@dataclass(frozen=True)
class AttentionPoints:
    """What each MatMul input passes through: ``query`` (already scaled) and ``key`` (transposed, Kᵀ) feed Q·Kᵀ, ``probs``
    (the softmax output) and ``value`` feed probs·V. Identity by default; fake quantizers for INT8."""

    query: Point = _same
    key: Point = _same
    probs: Point = _same
    value: Point = _same


PLAIN = AttentionPoints()


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    points: AttentionPoints = PLAIN,
    training: bool = False,
) -> Tensor:
    """``softmax((Q·scale)·Kᵀ + mask)·V`` in plain ops; the arguments are those of ``F.scaled_dot_product_attention``.

    Args:
        attn_mask: bool (True: attend) or float (added to the scores), broadcast to ``[..., L, S]``.
        dropout_p: applied to the attention weights only when ``training`` (exports are of eval models; the
            libraries routed here pass ``dropout_p`` > 0 only when training).
        scale: default ``1/sqrt(head_dim)``.
        enable_gqa: key/value with fewer heads than query are repeated to match (grouped-query attention).
        points: what the four MatMul inputs pass through (see :class:`AttentionPoints`).

    Raises:
        ValueError: ``is_causal`` together with ``attn_mask`` (as ``scaled_dot_product_attention``), or
            query heads not a multiple of key heads under ``enable_gqa``.
    """
    if is_causal and attn_mask is not None:
        raise ValueError("attention: is_causal with an explicit attn_mask; pass one or the other")
    if enable_gqa and query.size(-3) != key.size(-3):
        if query.size(-3) % key.size(-3):
            raise ValueError(f"attention: {query.size(-3)} query heads are not a multiple of {key.size(-3)} key heads")
        groups = query.size(-3) // key.size(-3)
        key, value = key.repeat_interleave(groups, -3), value.repeat_interleave(groups, -3)
    factor = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    scores = points.query(query * factor) @ points.key(key.transpose(-2, -1))  # Kᵀ: DQ feeds the MatMul directly
    if is_causal:
        rows = torch.arange(query.size(-2), device=query.device)
        cols = torch.arange(key.size(-2), device=query.device)
        attn_mask = cols[None, :] <= rows[:, None]  # tril() without aten::tril, which exports only from opset 14
    attends = None  # query rows that attend to some key: torch gives the others 0, where softmax gives NaN
    if attn_mask is not None and not is_causal:  # a causal row always keeps its diagonal
        attends = (attn_mask if attn_mask.dtype == torch.bool else attn_mask != float("-inf")).any(-1, keepdim=True)
        attn_mask = attn_mask | attends.logical_not() if attn_mask.dtype == torch.bool else attn_mask.masked_fill(
            attends.logical_not(), 0.0)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(attn_mask.logical_not(), float("-inf"))
        else:
            scores = scores + attn_mask
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0 and training:
        probs = F.dropout(probs, dropout_p)
    out = points.probs(probs) @ points.value(value)
    return out if attends is None else out * attends  # after the MatMul: Softmax still feeds it directly


def scaled_dot_product_attention(*args: object, **kwargs: object) -> Tensor:
    """``F.scaled_dot_product_attention`` looked up at call time: what a ``torch.fx`` graph calls instead of the
    builtin it recorded, so :func:`explicit_attention` still reaches it (the builtin would bypass the switch)."""
    return F.scaled_dot_product_attention(*args, **kwargs)


def _routed_attention(points: AttentionPoints, training: bool) -> Callable[..., Tensor]:
    def routed(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
               is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Tensor:
        return attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, points=points,
                         training=training)

    return routed


@contextmanager
def explicit_attention(points: AttentionPoints = PLAIN, *, training: bool = False) -> Iterator[None]:
    """While active, ``F.scaled_dot_product_attention`` is :func:`attention` (dropout only with ``training``), and the native
    fast path of ``nn.MultiheadAttention``/``nn.TransformerEncoderLayer`` (one fused kernel that no exporter
    and no quantizer can see into) is off. Both are restored on exit; nesting restores the outer setting."""
    saved = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _routed_attention(points, training)
    try:
        with no_mha_fastpath():
            yield
    finally:
        F.scaled_dot_product_attention = saved


@contextmanager
def no_mha_fastpath() -> Iterator[None]:
    """Run ``nn.MultiheadAttention``/``nn.TransformerEncoderLayer`` through their matmuls, not their one fused
    native kernel (which no exporter, quantizer or MACs counter can see into); the setting is restored on exit."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)
