"""Head-aware channel choice for groups that run through ``nn.MultiheadAttention``.

``nn.MultiheadAttention`` ties its inner width to the model's embedding: its q/k/v projections and
``out_proj`` are ``embed_dim`` wide, split into ``num_heads`` heads of ``head_dim``. Torch-Pruning's
dependency graph therefore puts the embedding channels (patch embedding, class token, position
embedding, LayerNorms, every block's ``out_proj`` and MLP output) and the attention's inner channels
in one group, channel ``i`` of each going together. Removing arbitrary channels of that group would
move channels between heads; here they go head by head instead, as Torch-Pruning's
``prune_num_heads`` / ``prune_head_dims`` do:

- whole heads (``num_heads`` drops, ``head_dim`` stays), ranked by the mean score of their channels;
- the same number of channels from every remaining head (``head_dim`` drops), the lowest within each.

Such a group always follows the ratio this way, also under ``scope: global`` (a global ranking would give
heads unequal widths); the other groups are ranked as usual.

:func:`sync` then keeps the bookkeeping attributes of the modules around the attention consistent
(``EncoderBlock.num_heads``, torchvision ``VisionTransformer.hidden_dim``), so the pruned model runs,
is recorded in the pruning plan and replays without pickle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

# Attributes of modules around an attention that repeat its sizes (torchvision's EncoderBlock.num_heads,
# VisionTransformer.hidden_dim, Hugging Face-style embed_dim/hidden_size): kept equal to the attention's.
_HEAD_COUNTS = ("num_heads", "num_attention_heads")
_WIDTHS = ("hidden_dim", "embed_dim", "hidden_size")


@dataclass(frozen=True)
class HeadOptions:
    """What may go in an attention group (Torch-Pruning's names).

    Attributes:
        prune_num_heads: remove whole heads.
        prune_head_dims: remove channels inside every head (the same number from each).
        head_pruning_ratio: fraction of the first step's heads to remove; None: the channel ratio (then
            the embedding shrinks by whole heads and head dims stay, but for rounding).
    """

    prune_num_heads: bool = False
    prune_head_dims: bool = True
    head_pruning_ratio: float | None = None


@dataclass
class Attention:
    """The attentions of one group: they share the group's channels, so also their head layout."""

    modules: list[nn.MultiheadAttention]
    names: list[str]

    @property
    def num_heads(self) -> int:
        return self.modules[0].num_heads

    @property
    def head_dim(self) -> int:
        return self.modules[0].head_dim

    @property
    def embed_dim(self) -> int:
        return self.modules[0].embed_dim


def attention_of(tp_group: object, names: dict[nn.Module, str]) -> tuple[Attention | None, str | None]:
    """The ``nn.MultiheadAttention`` modules in a Torch-Pruning group, and why the group cannot be pruned
    head-wise (None: it can, or it has no attention)."""
    found: list[nn.MultiheadAttention] = []
    for dep, _idxs in tp_group:  # type: ignore[attr-defined]
        module = dep.target.module
        if isinstance(module, nn.MultiheadAttention) and module not in found:
            found.append(module)
    if not found:
        return None, None
    attn = Attention(found, [names.get(m, "?") for m in found])
    for module, name in zip(found, attn.names, strict=True):
        if not module._qkv_same_embed_dim:
            return attn, f"attention '{name}' has separate q/k/v weights (kdim/vdim differ from embed_dim)"
        if (module.num_heads, module.head_dim) != (attn.num_heads, attn.head_dim):
            return attn, f"attention '{name}' has a head layout unlike '{attn.names[0]}'"
    return attn, None


def attention_scores(attn: Attention, scores: torch.Tensor) -> torch.Tensor:
    """``scores`` (per embedding channel, mean-normalised) plus each channel's share of the attention weights.

    Torch-Pruning's magnitude importance does not read ``nn.MultiheadAttention``'s packed ``in_proj_weight``;
    its q/k/v rows, its input column and ``out_proj``'s row and column of channel ``i`` are added here,
    normalised by their mean like the rest.
    """
    extra = torch.zeros_like(scores)
    e = attn.embed_dim
    for m in attn.modules:
        w = m.in_proj_weight.detach().abs().float().cpu()
        o = m.out_proj.weight.detach().abs().float().cpu()
        extra += w[:e].sum(1) + w[e:2 * e].sum(1) + w[2 * e:].sum(1) + w.sum(0) + o.sum(0) + o.sum(1)
    return scores / scores.mean().clamp_min(1e-12) + extra / extra.mean().clamp_min(1e-12)


@dataclass(frozen=True)
class HeadCut:
    """The channels one attention group loses now, and the head layout it will have."""

    idxs: list[int]
    num_heads: int
    head_dim: int


def choose(attn: Attention, scores: torch.Tensor, ratio: float, first: tuple[int, int], options: HeadOptions,
           round_to: int) -> HeadCut:
    """Which embedding channels go: whole heads, then the same count inside every remaining head.

    ``ratio`` counts embedding channels, as for any group: ``heads * head_dim`` keeps about ``1 - ratio`` of
    its first size. Whole heads go first (``head_pruning_ratio`` of them, or ``ratio`` when not given, so
    by default head dims stay); head dims then shrink to what is left to remove.

    Args:
        scores: one per embedding channel (``heads * head_dim``).
        ratio: the channel ratio of this step (of the first step's sizes).
        first: ``(num_heads, head_dim)`` at the first step; ratios count against these.
        round_to: the kept ``head_dim`` is a multiple of this (rounded up, never above the current).
    """
    heads, dim = attn.num_heads, attn.head_dim
    per_head = scores.view(heads, dim)
    keep_heads = heads
    if options.prune_num_heads:
        head_ratio = ratio if options.head_pruning_ratio is None else options.head_pruning_ratio
        keep_heads = min(max(first[0] - math.floor(first[0] * head_ratio), 1), heads)
    drop_heads = set(torch.argsort(per_head.mean(1), stable=True)[: heads - keep_heads].tolist())
    keep_dim = dim
    if options.prune_head_dims:
        width = first[0] * first[1]
        keep_dim = max(math.ceil((width - math.floor(width * ratio)) / keep_heads), 1)
        if round_to > 1:
            keep_dim = math.ceil(keep_dim / round_to) * round_to
        keep_dim = min(keep_dim, dim)
    idxs: list[int] = []
    for h in range(heads):
        if h in drop_heads:
            idxs += range(h * dim, (h + 1) * dim)
        elif keep_dim < dim:
            low = torch.argsort(per_head[h], stable=True)[: dim - keep_dim]
            idxs += (low + h * dim).tolist()
    return HeadCut(sorted(idxs), keep_heads, keep_dim)


def set_heads(attn: Attention, num_heads: int) -> None:
    """Set the head count before the surgery, so Torch-Pruning's pruner derives ``head_dim`` from it."""
    for m in attn.modules:
        m.num_heads = num_heads


def sync(model: nn.Module, attn: Attention, old_width: int, old_heads: int) -> None:
    """Make the attributes around the pruned attentions repeat their new sizes.

    A module that holds one of the attentions gets its ``num_heads`` (if it equalled ``old_heads``); a module
    above them whose ``hidden_dim``/``embed_dim``/``hidden_size`` equalled ``old_width`` gets the new width.
    """
    heads, width = attn.num_heads, attn.embed_dim
    for m in attn.modules:
        m.head_dim = width // heads
        m.kdim = m.vdim = width
    owners = {id(m) for m in attn.modules}
    for _name, module in model.named_modules():
        children = {id(c) for c in module.children()}
        holds = bool(children & owners) or any(id(c) in owners for c in module.modules())
        if not holds or id(module) in owners:
            continue
        for key in _HEAD_COUNTS:
            if children & owners and getattr(module, key, None) == old_heads and isinstance(old_heads, int):
                setattr(module, key, heads)
        for key in _WIDTHS:
            if getattr(module, key, None) == old_width:
                setattr(module, key, width)


def foreign_attention(model: nn.Module) -> dict[str, str]:
    """Attention modules pruned head-wise by no one: ``{name: type}`` of modules other than
    ``nn.MultiheadAttention`` that split their projections into heads (an int ``num_heads`` or
    ``num_attention_heads``: Hugging Face self-attention, timm ``Attention``). Pruning the output channels of
    the layers inside them channel by channel would mix heads while their head count stays as it was."""
    found = {}
    for name, m in model.named_modules():
        heads = getattr(m, "num_attention_heads", getattr(m, "num_heads", None))
        if not name or isinstance(heads, bool) or not isinstance(heads, int):
            continue
        owns_projections = any(isinstance(c, nn.Linear) for c in m.children())  # not a block that holds an MHA
        if owns_projections and not any(isinstance(d, nn.MultiheadAttention) for d in m.modules()):
            found[name] = type(m).__name__
    return found
