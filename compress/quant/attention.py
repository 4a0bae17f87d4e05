"""INT8 attention: ``nn.MultiheadAttention`` rewritten so every matmul in it can be quantized.

``nn.MultiheadAttention`` keeps its Q/K/V projections in one fused ``in_proj_weight`` and runs the
attention inside ``F.multi_head_attention_forward``, so neither its projections nor its two attention
MatMuls can carry quantizers, and the exporter has no opset-13 form for the fused kernel.
:class:`QuantMultiheadAttention` computes the same function from parts a quantizer can reach:

- ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``: plain ``nn.Linear`` layers (the fused weight split
  by rows), which :func:`compress.quant.prepare` turns into ``QuantLinear`` like any other layer;
- the attention written out by :func:`compress.attention.attention` (``softmax((q * scale) @ kᵀ + mask) @ v``,
  the scale applied on the Q side), with a quantizer on each input of both attention MatMuls (``q_quantizer``,
  ``k_quantizer``, ``probs_quantizer`` on the softmax output, ``v_quantizer``): in ONNX a DequantizeLinear feeds
  each MatMul input directly, TensorRT's explicit-quantization pattern for its fused INT8 attention.
  With ``matmuls=False`` (ModelOpt's ``disable_mha_qdq``) those four are identities and the attention
  MatMuls stay float while the projections are still quantized.

The rewrite is numerically the module it replaces (same weights; only the float summation order of the
split projections differs).
"""

from __future__ import annotations

import torch
from torch import fx, nn

from compress.attention import AttentionPoints, attention
from compress.quant.quantizer import TensorQuantizer
from compress.quant.spec import QuantSpec

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
MATMUL_QUANTIZERS = ("q_quantizer", "k_quantizer", "probs_quantizer", "v_quantizer")


def unsupported(mha: nn.MultiheadAttention) -> str | None:
    """Why ``mha`` cannot be rewritten (kept float), or None."""
    if mha.bias_k is not None or mha.bias_v is not None:
        return "add_bias_kv is not supported by the INT8 attention rewrite"
    if mha.add_zero_attn:
        return "add_zero_attn is not supported by the INT8 attention rewrite"
    return None


@fx.wrap
def additive_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, batch: int, heads: int,
                  dtype: torch.dtype) -> torch.Tensor | None:
    """``attn_mask`` (``[L, S]`` or ``[N*H, L, S]``) and ``key_padding_mask`` (``[N, S]``), boolean (True =
    masked out) or additive float, as one additive float mask broadcastable to ``[N, H, L, S]``."""
    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    out = None
    if attn_mask is not None:
        out = additive(attn_mask)
        out = out.view(batch, heads, *out.shape[-2:]) if out.dim() == 3 else out.view(1, 1, *out.shape)
    if key_padding_mask is not None:
        pad = additive(key_padding_mask).view(batch, 1, 1, -1)
        out = pad if out is None else out + pad
    return out


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The softmax weights ``nn.MultiheadAttention`` returns with ``need_weights`` (float; not what the
    quantized MatMuls see)."""
    scores = (q * q.size(-1) ** -0.5) @ k.transpose(-2, -1)
    return (scores if mask is None else scores + mask).softmax(-1)


class QuantMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (batched inputs) with split projections and quantizable attention MatMuls."""

    def __init__(self, mha: nn.MultiheadAttention, spec: QuantSpec | None, name: str = "", *, matmuls: bool = True) -> None:
        super().__init__()
        reason = unsupported(mha)
        if reason is not None:
            raise ValueError(reason)
        self.embed_dim, self.num_heads, self.head_dim = mha.embed_dim, mha.num_heads, mha.head_dim
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        e = mha.embed_dim
        if mha.in_proj_weight is not None:
            weights = mha.in_proj_weight.detach().split(e)
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        biases = mha.in_proj_bias.detach().split(e) if mha.in_proj_bias is not None else (None, None, None)
        for proj, w, b in zip(PROJECTIONS[:3], weights, biases, strict=True):
            layer = nn.Linear(w.shape[1], e, bias=b is not None, device=w.device, dtype=w.dtype)
            layer.weight = nn.Parameter(w.clone(), requires_grad=mha.out_proj.weight.requires_grad)
            if b is not None:
                layer.bias = nn.Parameter(b.clone(), requires_grad=mha.out_proj.weight.requires_grad)
            setattr(self, proj, layer)
        out = mha.out_proj  # NonDynamicallyQuantizableLinear: a plain Linear sharing its parameters
        self.out_proj = nn.Linear(out.in_features, out.out_features, bias=out.bias is not None,
                                  device=out.weight.device, dtype=out.weight.dtype)
        self.out_proj.weight, self.out_proj.bias = out.weight, out.bias
        for q in MATMUL_QUANTIZERS:
            quantizer = TensorQuantizer(spec, name=f"{name}.{q}") if matmuls and spec is not None else nn.Identity()
            setattr(self, q, quantizer)
        self.train(mha.training)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # [N, T, E] -> [N, H, T, d]

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,  # a hint about attn_mask, as in nn.MultiheadAttention; the mask decides
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not fx._symbolic_trace.is_fx_tracing() and query.dim() != 3:
            raise ValueError(f"{type(self).__name__}: batched (3-d) inputs only, got a {query.dim()}-d query; "
                             "quantize with attention: fused to keep nn.MultiheadAttention for unbatched inputs")
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        mask = additive_mask(attn_mask, key_padding_mask, query.shape[0], self.num_heads, q.dtype)
        points = AttentionPoints(self.q_quantizer, self.k_quantizer, self.probs_quantizer, self.v_quantizer)
        out = attention(q, k, v, mask, self.dropout, points=points, training=self.training)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        if not self.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:  # as nn.MultiheadAttention returns them (before dropout)
            probs = attention_weights(q, k, mask)
            weights = probs.mean(1) if average_attn_weights else probs
        return out, weights


def rewrite(root: nn.Module, spec: QuantSpec | None, *, matmuls: bool, skip: set[str]) -> tuple[list[str], dict[str, str]]:
    """Replace every ``nn.MultiheadAttention`` in ``root`` (in place) not named in ``skip``.

    Returns:
        The names rewritten, and ``{name: reason}`` for those kept as they are.
    """
    done: list[str] = []
    kept: dict[str, str] = {}
    for name, module in list(root.named_modules()):
        if type(module) is not nn.MultiheadAttention or name in skip:
            continue
        reason = unsupported(module)
        if reason is not None:
            kept[name] = reason
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, leaf,
                QuantMultiheadAttention(module, spec, name, matmuls=matmuls))
        done.append(name)
    return done, kept
