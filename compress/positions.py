"""Per-position outputs: which axis of a model output holds the classes, and which positions count.

An output ``[N, C]`` has one arg-max per sample. Outputs with positions are compared position by
position (agreement, top-1 against labels of the positions' shape):

- ``[N, C, H, W]`` and higher: classes second (convolutional maps; per pixel).
- ``[N, A, B]`` is either per token ``[N, T, C]`` (classes last, as Hugging Face and timm token outputs
  are) or a 1-D convolution's map ``[N, C, L]`` (classes second). The rule: a batch's *lengths* are the
  last dim of each 2-D or 3-D input tensor (token ids and masks ``[N, T]``, signals ``[N, channels, L]``)
  and of ``[N, T]`` labels. A batch where ``A`` is a length and ``B`` is not says ``[N, T, C]``; ``B``
  and not ``A`` says ``[N, C, L]``; both (``A == B``) says nothing. Batches that say different things,
  or a 3-D output where some batch matched a length but none could tell (the number of classes equals
  the sequence length on every batch), are refused in one line. A 3-D output matching no length at all
  (a ViT's ``[N, 197, 768]`` tokens from ``[N, 3, 224, 224]`` images) has no known positions and is
  compared per sample, as ``[N, C]`` is (one arg-max over the whole output).

Positions that do not count: the padding :func:`pad_cat` adds when batches have different lengths, and
positions whose attention mask (:func:`attention_mask`) is 0. Labels outside ``0..classes-1`` (Hugging
Face's ignore index -100, segmentation's 255) are left out of the task metric only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Union

import torch
import torch.nn.functional as F

from compress.errors import CompressError, DataError
from compress.inputs import Inputs, tensors

IGNORE_INDEX = -100  # Hugging Face's label for positions no loss or metric counts; labels are padded with it
MASK_NAMES = ("attention_mask",)


def default_class_dim(ndim: int) -> int | None:
    """The class axis of an output of ``ndim`` dims when nothing else tells: 1, or None (per sample) for 3-D."""
    return None if ndim in (1, 3) else 1


Dim = Union[int, None, Literal["auto"]]  # noqa: UP007 (a runtime alias) the class axis; "auto": by rank


def resolve_dim(outputs: torch.Tensor, dim: Dim) -> int | None:
    """``dim``, or the default for the rank of ``outputs`` when ``"auto"``."""
    return default_class_dim(outputs.ndim) if dim == "auto" else dim


def lengths(inputs: Inputs, labels: torch.Tensor | None) -> set[int]:
    """A batch's sequence lengths (see the module doc)."""
    found = {int(t.shape[-1]) for t in tensors(inputs) if t.dim() in (2, 3)}
    if isinstance(labels, torch.Tensor) and labels.dim() == 2:
        found.add(int(labels.shape[1]))
    return found


def class_dim(shapes: Sequence[Sequence[int]], batch_lengths: Sequence[set[int]], name: str) -> int | None:
    """The class axis of an output from its shape on each batch and each batch's lengths (module doc rule).

    Returns:
        1 or 2 for a 3-D output (``[N, C, L]`` / ``[N, T, C]``), None when it is compared per sample.

    Raises:
        CompressError: a 3-D output whose class axis cannot be told, or that batches tell apart.
    """
    ndim = len(shapes[0])
    if ndim != 3:
        return default_class_dim(ndim)
    votes, matched = set(), False
    for (_, a, b), found in zip(shapes, batch_lengths, strict=True):
        matched |= a in found or b in found
        if (a in found) != (b in found):
            votes.add(2 if a in found else 1)
    if len(votes) == 1:
        return votes.pop()
    if votes or matched:
        seen = sorted(set().union(*batch_lengths))
        raise CompressError(f"output '{name}' of shape {list(shapes[0])}: cannot tell [N, positions, classes] from "
                            f"[N, classes, positions] (sequence lengths {seen}); use a sequence length other than "
                            "the number of classes")
    return None


def attention_mask(inputs: Inputs) -> torch.Tensor | None:
    """The batch's attention mask ``[N, T]`` as bool: the ``attention_mask`` entry of dict inputs, or in a
    tuple the first 2-D integer/bool tensor after the first that holds only 0 and 1; else None."""
    if isinstance(inputs, dict):
        mask = next((inputs[k] for k in MASK_NAMES if k in inputs), None)
        return mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    if isinstance(inputs, tuple):
        for t in inputs[1:]:
            if t.dim() == 2 and not t.is_floating_point() and bool(((t == 0) | (t == 1)).all()):
                return t.bool()
    return None


def valid_positions(output: torch.Tensor, dim: int | None, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Which positions of one batch's ``output`` count: the attention mask where it has the positions'
    shape, else all (None also for outputs compared per sample)."""
    if dim is None or output.dim() < 3:
        return None
    shape = (*output.shape[:dim], *output.shape[dim + 1:])
    if mask is not None and tuple(mask.shape) == shape:
        return mask.cpu()
    return torch.ones(shape, dtype=torch.bool)


def pad_cat(parts: Sequence[torch.Tensor], fill: float | int, keep: int | None, what: str) -> torch.Tensor:
    """Batches joined along dim 0, each first padded at the end of every other axis but ``keep`` (the class
    axis) with ``fill`` to the largest size: batches padded to different sequence lengths.

    Raises:
        DataError: the batches differ in rank or along ``keep``, naming ``what``.
    """
    if len({t.dim() for t in parts}) != 1 or (keep is not None and len({t.shape[keep] for t in parts}) != 1):
        shapes = sorted({str(list(t.shape[1:])) for t in parts})
        raise DataError(f"{what}: per-sample shapes differ between batches ({', '.join(shapes[:3])}) beyond padding")
    size = [max(int(t.shape[d]) for t in parts) for d in range(parts[0].dim())]
    padded = []
    for t in parts:
        pad: list[int] = []
        for d in range(t.dim() - 1, 0, -1):  # F.pad lists the last axis first
            pad += [0, size[d] - int(t.shape[d])]
        padded.append(F.pad(t, pad, value=fill) if any(pad) else t)
    return torch.cat(padded)
