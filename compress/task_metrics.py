"""Task metrics against labels: top-1 (per sample, or per position), pixel accuracy and mean IoU.

Per-position outputs (``[N, C, H, W]``, per-token ``[N, T, C]``; the class axis ``dim`` as
:mod:`compress.positions` tells it) are scored position by position; positions whose label is not a class
(-100, 255) and those ``valid`` marks False (padding, a zero attention mask) are left out.
"""

from __future__ import annotations

import torch

from compress.errors import DataError
from compress.positions import Dim, resolve_dim


def _per_position(outputs: torch.Tensor, labels: torch.Tensor, dim: int | None, valid: torch.Tensor | None,
                  name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(predicted classes, labels, classes)`` of the positions that count, flattened: those ``valid`` keeps
    whose label is a class (an ignore index, -100 or 255, is left out)."""
    if dim is None or outputs.ndim < 3 or labels.shape != (*outputs.shape[:dim], *outputs.shape[dim + 1:]):
        raise DataError(f"{name} needs (N, classes, H, W) outputs and (N, H, W) labels (or (N, T, classes) and "
                        f"(N, T)), got {list(outputs.shape)} and {list(labels.shape)}")
    classes = outputs.shape[dim]
    keep = (labels >= 0) & (labels < classes)
    if valid is not None:
        keep &= valid
    return outputs.argmax(dim)[keep], labels[keep].long(), classes


def top1(outputs: torch.Tensor, labels: torch.Tensor, dim: Dim = "auto", valid: torch.Tensor | None = None) -> float:
    """Fraction of samples whose arg-max output equals the label; for per-position outputs (``dim``: the
    class axis, see :mod:`compress.positions`) the fraction of positions, as :func:`pixel_accuracy`."""
    dim = resolve_dim(outputs, dim)
    if dim is not None and outputs.ndim > 2:
        return pixel_accuracy(outputs, labels, dim, valid)
    if outputs.ndim != 2 or labels.ndim != 1 or len(outputs) != len(labels):
        raise DataError(f"top1 needs (N, classes) outputs and N labels, got {list(outputs.shape)} and {list(labels.shape)}")
    return float((outputs.argmax(1) == labels).float().mean())


def pixel_accuracy(outputs: torch.Tensor, labels: torch.Tensor, dim: Dim = "auto",
                   valid: torch.Tensor | None = None) -> float:
    """Fraction of positions (pixels, tokens) whose arg-max over classes equals the label (positions labelled
    outside 0..classes-1, an ignore index such as 255 or -100, are left out here and in :func:`miou`, as are
    those ``valid`` marks False: padding, a zero attention mask).

    Raises:
        DataError: labels not of the positions' shape, or no position with a label.
    """
    pred, labels, _ = _per_position(outputs, labels, resolve_dim(outputs, dim), valid, "pixel_accuracy")
    if not labels.numel():
        raise DataError("pixel_accuracy: no position has a label in 0..classes-1")
    return float((pred == labels).double().mean())


def miou(outputs: torch.Tensor, labels: torch.Tensor, dim: Dim = "auto", valid: torch.Tensor | None = None) -> float:
    """Mean intersection over union of the arg-max classes, over the classes present in the labels or
    the predictions (a class absent from both has no IoU and is left out); positions as :func:`pixel_accuracy`."""
    pred, labels, classes = _per_position(outputs, labels, resolve_dim(outputs, dim), valid, "miou")
    bins = torch.bincount(labels * classes + pred, minlength=classes * classes).reshape(classes, classes).double()
    inter = bins.diagonal()
    union = bins.sum(0) + bins.sum(1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean())


TASK = {"top1": top1, "pixel_accuracy": pixel_accuracy, "miou": miou}


def check_labels(logits: torch.Tensor, labels: torch.Tensor | None, where: str, dim: int = 1) -> None:
    """Class indices must address the model's outputs: 0..classes-1 (classes on ``dim`` of ``logits``).

    Checked: integer ``(N,)`` labels against ``(N, classes)`` logits, ``(N, H, W)`` against ``(N, classes, H, W)``
    and per-token ``(N, T)`` against ``(N, T, classes)`` (``dim`` 2), where -100 (Hugging Face's ignore index,
    what cross-entropy skips) is allowed too. Soft or absent labels pass.

    Raises:
        DataError: a label outside 0..classes-1, naming ``where``.
    """
    if labels is None or labels.is_floating_point() or not labels.numel():
        return
    if logits.ndim != labels.ndim + 1 or logits.ndim not in (2, 3, 4) or (logits.ndim == 3 and dim != 2):
        return
    counted = labels[labels != -100] if logits.ndim == 3 else labels
    if not counted.numel():
        return
    low, high = int(counted.min()), int(counted.max())
    if low < 0 or high >= logits.shape[dim]:
        raise DataError(f"{where}: labels range over {low}..{high} but the model outputs {logits.shape[dim]} classes")


