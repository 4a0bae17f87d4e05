"""Distillation losses: logits KD and feature hints (with a learned projection where shapes differ)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.distill.options import HintLoss
from compress.errors import CompressError


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, dim: int = 1) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, averaged over samples (Hinton et al.).

    Classes are on ``dim`` (1: ``[N, C]``, ``[N, C, H, W]``; 2: per-token ``[N, T, C]``, see
    :mod:`compress.positions`); outputs with positions average over every position.
    The ``T^2`` keeps gradient magnitudes comparable across temperatures.
    """
    if student.shape != teacher.shape or student.ndim < 2:
        raise CompressError(f"distill: student outputs {list(student.shape)} and the teacher {list(teacher.shape)}; "
                            "logits KD needs equal shapes [N, classes, ...]")
    classes = student.shape[dim]
    s = (student.float() / temperature).movedim(dim, -1).reshape(-1, classes)
    t = (teacher.float() / temperature).movedim(dim, -1).reshape(-1, classes)
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), reduction="batchmean", log_target=True)
    return kl * temperature**2


def hint_loss(student: torch.Tensor, teacher: torch.Tensor, kind: HintLoss = HintLoss.mse) -> torch.Tensor:
    """MSE, or ``1 - cosine`` per sample, between (projected) student and teacher features."""
    s, t = student.float(), teacher.float()
    if kind is HintLoss.mse:
        return F.mse_loss(s, t)
    return (1.0 - F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1)).mean()


class Projection(nn.Module):
    """Maps a student feature onto its teacher's shape: a 1x1 conv (``[N, C, H, W]``) or a Linear
    on the last dim (``[N, C]``, ``[N, L, C]``) when channels differ, then adaptive average pooling
    when the spatial size differs. Trained with the student; dropped after distillation."""

    def __init__(self, student_shape: torch.Size, teacher_shape: torch.Size, where: str) -> None:
        super().__init__()
        if len(student_shape) != len(teacher_shape) or len(student_shape) < 2:
            raise CompressError(
                f"{where}: the student layer gives {list(student_shape)[1:]} per sample but the "
                f"teacher layer {list(teacher_shape)[1:]}; hints need features of the same rank"
            )
        self.conv = len(student_shape) == 4
        dim = 1 if self.conv else -1
        cs, ct = student_shape[dim], teacher_shape[dim]
        self.map: nn.Module | None = None
        if cs != ct:
            self.map = nn.Conv2d(cs, ct, 1, bias=False) if self.conv else nn.Linear(cs, ct, bias=False)
        self.size = tuple(teacher_shape[2:]) if self.conv and student_shape[2:] != teacher_shape[2:] else None
        if not self.conv and student_shape[1:-1] != teacher_shape[1:-1]:
            raise CompressError(
                f"{where}: the student layer gives {list(student_shape)[1:]} per sample but the "
                f"teacher layer {list(teacher_shape)[1:]}; only the channel (last) dim may differ"
            )
        self.summary = ("conv1x1" if self.conv else "linear") + f" {cs}->{ct}" if self.map is not None else None
        if self.size is not None:
            self.summary = (self.summary + ", " if self.summary else "") + f"pool to {list(self.size)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.map is not None:
            x = self.map(x.to(self.map.weight.dtype))
        if self.size is not None:
            x = F.adaptive_avg_pool2d(x, self.size)
        return x
