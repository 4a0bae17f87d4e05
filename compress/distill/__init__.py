"""Teacher-student distillation: logits KD, feature hints, label-free KD, cached teachers.

The ``distill`` stage and every stage's ``finetune.distill`` block build a :class:`Distiller` and
plug its callback into the shared loop; training scripts use :class:`Distiller` directly.
"""

from compress.distill.distiller import DistillCallback, Distiller
from compress.distill.losses import hint_loss, kd_loss
from compress.distill.options import DistillOptions, HintLoss

__all__ = ["DistillCallback", "DistillOptions", "Distiller", "HintLoss", "hint_loss", "kd_loss"]
