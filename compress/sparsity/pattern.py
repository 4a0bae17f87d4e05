"""The 2:4 pattern: in every 4 consecutive weights along a layer's input dimension, at most 2 are nonzero.

Sparse tensor cores read a Linear weight ``[out, in]`` in groups of 4 along ``in``, and a Conv
weight ``[out, in, kh, kw]`` in groups of 4 input channels for each output channel and kernel
position. Every function here works on that view: :func:`rows` lays a weight out as
``[out * kh * kw, in]`` so the groups are 4 consecutive columns.
"""

from __future__ import annotations

import itertools

import torch

N, M = 2, 4  # keep N of every M
PATTERN = f"{N}:{M}"

# The 6 ways to keep 2 of 4, as codes 0..5 (a checkpoint stores one uint8 code per group).
_CHOICES = torch.tensor([[i in pair for i in range(M)] for pair in itertools.combinations(range(M), N)])
_BITS = torch.tensor([1, 2, 4, 8])
_CODE_OF_BITS = torch.full((16,), 255, dtype=torch.uint8)
for _code, _keep in enumerate(_CHOICES):
    _CODE_OF_BITS[int((_keep.long() * _BITS).sum())] = _code


def rows(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as ``[rows, in]``: input channels last, so 2:4 groups are 4 consecutive columns."""
    if weight.ndim == 2:
        return weight
    return weight.movedim(1, -1).reshape(-1, weight.shape[1])


def unrows(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rows` for a tensor shaped like ``like``."""
    if like.ndim == 2:
        return flat
    shape = [like.shape[0], *like.shape[2:], like.shape[1]]
    return flat.reshape(shape).movedim(-1, 1)


@torch.no_grad()
def mask_2to4(weight: torch.Tensor) -> torch.Tensor:
    """The boolean keep-mask of ``weight`` keeping the 2 largest |w| of every 4 input-channel weights.

    Ties keep the earlier weight, so the mask is deterministic. The input dimension must divide by 4.
    """
    groups = rows(weight).detach().abs().float().reshape(-1, M)
    order = torch.sort(-groups, dim=1, stable=True).indices[:, :N]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True)
    return unrows(keep.reshape(rows(weight).shape), weight)


def satisfies(weight: torch.Tensor) -> bool:
    """Whether every group of 4 input-channel weights has at most 2 nonzeros."""
    flat = rows(weight)
    if flat.shape[1] % M:
        return False
    return bool(((flat.reshape(-1, M) != 0).sum(1) <= N).all())


def violations(weight: torch.Tensor) -> int:
    """Groups of 4 with more than 2 nonzeros (0 means the weight is 2:4)."""
    return int(((rows(weight).reshape(-1, M) != 0).sum(1) > N).sum())


@torch.no_grad()
def retained(weight: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """The share of ``sum |w|`` a keep-mask retains (the 2:4 magnitude mask when none is given)."""
    mags = weight.detach().abs().float()
    total = float(mags.sum())
    if total == 0:
        return 1.0
    keep = mask_2to4(weight) if mask is None else mask
    return float(mags[keep].sum()) / total


def encode(mask: torch.Tensor) -> torch.Tensor:
    """A 2:4 keep-mask as one uint8 code per group (4x smaller than a bool mask).

    Raises:
        ValueError: a group does not keep exactly 2 of 4.
    """
    groups = rows(mask).reshape(-1, M).long().cpu()
    codes = _CODE_OF_BITS[(groups * _BITS).sum(1)]
    if bool((codes == 255).any()):
        raise ValueError("the mask does not keep exactly 2 of every 4 weights")
    return codes


def decode(codes: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The boolean keep-mask shaped like ``like`` (a weight) from :func:`encode`'s codes.

    Raises:
        ValueError: the codes do not fit the weight's shape or hold a value other than 0..5.
    """
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise ValueError("mask codes must be a uint8 tensor")
    groups = like.numel() // M
    if codes.numel() != groups or like.numel() % M or (codes.numel() and int(codes.max()) >= len(_CHOICES)):
        raise ValueError(f"{codes.numel()} mask codes do not fit a weight of shape {list(like.shape)}")
    flat = _CHOICES[codes.long()].reshape(rows(like).shape)
    return unrows(flat, like).to(like.device)
