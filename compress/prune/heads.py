"""Head-aware channel choice for groups whose channels form attention heads.

Two kinds of group:

- Through ``nn.MultiheadAttention``, whose inner width is the model's embedding: its q/k/v projections and
  ``out_proj`` are ``embed_dim`` wide, so Torch-Pruning's dependency graph puts the embedding channels (patch
  embedding, class token, position embedding, LayerNorms, every block's ``out_proj`` and MLP output) and the
  attention's inner channels in one group, channel ``i`` of each going together.
- Inside attentions that split their own projections into heads (Hugging Face ``BertSelfAttention``/
  ``ViTSelfAttention``: query/key/value Linears; timm ``Attention``: one packed qkv Linear): the q/k/v output
  channels and the output projection's inputs form one group; the embedding is another, pruned as usual.

Removing arbitrary channels of such a group would move channels between heads; here they go head by head
instead, as Torch-Pruning's ``prune_num_heads`` / ``prune_head_dims`` do:

- whole heads (``num_heads`` drops, ``head_dim`` stays), ranked by the mean score of their channels;
- the same number of channels from every remaining head (``head_dim`` drops), the lowest within each.

Such a group always follows the ratio this way, also under ``scope: global`` (a global ranking would give
heads unequal widths); the other groups are ranked as usual.

:func:`sync` then keeps the bookkeeping attributes consistent (``EncoderBlock.num_heads``, torchvision
``VisionTransformer.hidden_dim``; Hugging Face ``num_attention_heads``/``attention_head_size``/``all_head_size``;
timm ``num_heads``/``head_dim``/``attn_dim``), so the pruned model runs, is recorded in the pruning plan and
replays without pickle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

# Attributes of modules around an attention that repeat its sizes (torchvision's EncoderBlock.num_heads,
# VisionTransformer.hidden_dim, Hugging Face-style embed_dim/hidden_size): kept equal to the attention's.
_HEAD_COUNTS = ("num_heads", "num_attention_heads", "n_heads")
_WIDTHS = ("hidden_dim", "embed_dim", "hidden_size")
# What a head-split attention other than nn.MultiheadAttention calls its head size and its inner width
# (Hugging Face: attention_head_size, all_head_size; timm: head_dim, attn_dim).
_HEAD_DIMS = ("attention_head_size", "head_dim")
_INNER_WIDTHS = ("all_head_size", "attn_dim")


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


class Layout(str, Enum):
    """How an attention's channels form heads (channel ``h * head_dim + d`` is dim ``d`` of head ``h``)."""

    mha = "nn.MultiheadAttention"  # its width is the embedding's; Torch-Pruning's MHA pruner resizes it
    split = "separate q/k/v projections"  # Hugging Face: query, key, value Linears, heads * head_dim each
    packed = "one qkv projection"  # timm: one Linear of 3 * heads * head_dim outputs, laid out [3, heads, head_dim]


def _int_attr(module: nn.Module, keys: tuple[str, ...]) -> tuple[str, int] | None:
    for key in keys:
        value = getattr(module, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return key, value
    return None


@dataclass
class Attention:
    """The attentions of one group: they share the group's channels, so also their head layout."""

    modules: list[nn.Module]
    names: list[str]
    layout: Layout = Layout.mha
    per_head_norm: str | None = None  # a child normalising q or k over head_dim (timm qk_norm): head dims stay

    @property
    def num_heads(self) -> int:
        m = self.modules[0]
        return m.num_heads if self.layout is Layout.mha else _int_attr(m, _HEAD_COUNTS)[1]  # type: ignore[index]

    @property
    def head_dim(self) -> int:
        m = self.modules[0]
        return m.head_dim if self.layout is Layout.mha else _int_attr(m, _HEAD_DIMS)[1]  # type: ignore[index]

    @property
    def embed_dim(self) -> int:
        """The attention's inner width, ``num_heads * head_dim`` (for nn.MultiheadAttention, the embedding's)."""
        return self.num_heads * self.head_dim

    @property
    def copies(self) -> int:
        """How many times the group holds the inner width (3 for a packed qkv projection)."""
        return 3 if self.layout is Layout.packed else 1

    def expand(self, idxs: list[int]) -> list[int]:
        """Channels of the inner width -> channels of the group (the same positions in q, k and v when packed)."""
        return [c * self.embed_dim + i for c in range(self.copies) for i in idxs]


def split_attention(model: nn.Module) -> dict[str, nn.Module]:
    """Attention modules other than ``nn.MultiheadAttention`` that split their projections into heads: those
    with an int head count (``num_heads``/``num_attention_heads``/``n_heads``) and Linear children (Hugging Face
    self-attention, timm ``Attention``); a block that merely holds an ``nn.MultiheadAttention`` is not one."""
    found = {}
    for name, m in model.named_modules():
        if not name or _int_attr(m, _HEAD_COUNTS) is None or isinstance(m, nn.MultiheadAttention):
            continue
        owns_projections = any(isinstance(c, nn.Linear) for c in m.children())
        if owns_projections and not any(isinstance(d, nn.MultiheadAttention) for d in m.modules()):
            found[name] = m
    return found


def attention_of(tp_group: object, names: dict[nn.Module, str], model: nn.Module,
                 channels: int) -> tuple[Attention | None, str | None]:
    """The attention modules whose heads a Torch-Pruning group's channels form, and why the group cannot be
    pruned head-wise (None: it can, or it has no attention).

    A group through ``nn.MultiheadAttention`` is the embedding (the attention's width is tied to it). For the
    other head-split attentions (:func:`split_attention`), the group whose output channels are all projections
    of one such module -- q, k and v (``split``) or one packed qkv Linear (``packed``) -- is its heads; its
    output projection and the embedding form other groups and prune channel by channel.
    """
    found: list[nn.Module] = []
    outputs: list[nn.Linear] = []
    for dep, _idxs in tp_group:  # type: ignore[attr-defined]
        module = dep.target.module
        if isinstance(module, nn.MultiheadAttention) and module not in found:
            found.append(module)
        elif isinstance(module, nn.Linear) and "out_channels" in dep.handler.__name__ and module not in outputs:
            outputs.append(module)
    if found:
        return _mha(found, names)
    split = split_attention(model)
    owners = {names.get(m, "?").rpartition(".")[0] for m in outputs}
    inside = [o for o in owners if o in split]
    if not inside:
        return None, None
    attn = Attention([split[inside[0]]], [inside[0]], Layout.split)
    if len(owners) > 1:  # layers outside it too: the embedding, which its output projection feeds
        return None, None
    if _int_attr(attn.modules[0], _HEAD_DIMS) is None:
        return attn, (f"attention '{inside[0]}' ({type(attn.modules[0]).__name__}) names no head size "
                      f"({' / '.join(_HEAD_DIMS)})")
    width = attn.embed_dim
    if len(outputs) == 1 and channels == 3 * width:
        attn.layout = Layout.packed
    elif not (len(outputs) >= 2 and channels == width and all(m.out_features == width for m in outputs)):
        # safe by default: pruning these channel by channel could move channels between heads
        return attn, (f"attention '{inside[0]}' ({type(attn.modules[0]).__name__}) splits these channels into heads "
                      "in a layout compress does not know (separate q/k/v or one packed qkv): the heads stay")
    attn.per_head_norm = next((f"{inside[0]}.{n}" for n, c in attn.modules[0].named_children()
                               if getattr(c, "weight", None) is not None and c.weight.dim() == 1
                               and c.weight.numel() == attn.head_dim), None)
    return attn, None


def _mha(found: list[nn.Module], names: dict[nn.Module, str]) -> tuple[Attention, str | None]:
    attn = Attention(found, [names.get(m, "?") for m in found])
    for module, name in zip(found, attn.names, strict=True):
        if not module._qkv_same_embed_dim:
            return attn, f"attention '{name}' has separate q/k/v weights (kdim/vdim differ from embed_dim)"
        if (module.num_heads, module.head_dim) != (attn.num_heads, attn.head_dim):
            return attn, f"attention '{name}' has a head layout unlike '{attn.names[0]}'"
    return attn, None


def attention_scores(attn: Attention, scores: torch.Tensor) -> torch.Tensor:
    """One score per channel of the attention's inner width (``heads * head_dim``), from the group's scores.

    A packed qkv projection's three copies of a channel add up. Torch-Pruning's magnitude importance does not
    read ``nn.MultiheadAttention``'s packed ``in_proj_weight``; there, its q/k/v rows, its input column and
    ``out_proj``'s row and column of channel ``i`` are added, normalised by their mean like the rest.
    """
    if attn.layout is not Layout.mha:
        return scores.view(attn.copies, -1).sum(0)
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
    """Before the surgery: nn.MultiheadAttention's head count, so Torch-Pruning's pruner derives ``head_dim``
    from it (the other layouts are told after, by :func:`sync`)."""
    if attn.layout is Layout.mha:
        for m in attn.modules:
            m.num_heads = num_heads


def sync(model: nn.Module, attn: Attention, cut: HeadCut, old_width: int, old_heads: int) -> None:
    """Make the attributes of and around the pruned attentions repeat their new sizes.

    nn.MultiheadAttention: its ``head_dim``/``kdim``/``vdim``; a module that holds one gets its ``num_heads``
    (if it equalled ``old_heads``); a module above them whose ``hidden_dim``/``embed_dim``/``hidden_size``
    equalled ``old_width`` gets the new width. Other layouts: the module's head count, head size and inner width
    (``all_head_size``/``attn_dim``); its ``scale`` stays, as the kept channels were trained with it.
    """
    if attn.layout is not Layout.mha:
        for m in attn.modules:
            width = _int_attr(m, _HEAD_COUNTS)[1] * _int_attr(m, _HEAD_DIMS)[1]  # type: ignore[index]
            setattr(m, _int_attr(m, _HEAD_COUNTS)[0], cut.num_heads)  # type: ignore[index]
            setattr(m, _int_attr(m, _HEAD_DIMS)[0], cut.head_dim)  # type: ignore[index]
            for key in _INNER_WIDTHS:
                if getattr(m, key, None) == width:
                    setattr(m, key, cut.num_heads * cut.head_dim)
        return
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


def head_layout(module: nn.Module) -> tuple[int, int] | None:
    """``(num_heads, head_dim)`` of an attention module (nn.MultiheadAttention or head-split), else None."""
    if isinstance(module, nn.MultiheadAttention):
        return module.num_heads, module.head_dim
    heads, dim = _int_attr(module, _HEAD_COUNTS), _int_attr(module, _HEAD_DIMS)
    if heads is None or dim is None or not any(isinstance(c, nn.Linear) for c in module.children()):
        return None
    return heads[1], dim[1]
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
