"""What the fine-tune loop shows its plug-ins (:class:`TrainState`) and the hooks they may override
(:class:`Callback`). Pruning masks, QAT range refresh and distillation are all callbacks."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class TrainState:
    """What callbacks see. ``model`` is the unwrapped module (never the DDP wrapper)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None = None  # None until the optimizer exists (``parameters`` is asked first)
    epoch: int = 0
    step: int = 0
    total_steps: int = 0  # optimizer steps the whole fine-tune will take (epochs x batches per epoch)
    num_samples: int = 0  # samples in the training dataset
    inputs: Any = None  # the batch's model inputs (compress.inputs: a tensor, a tuple or a dict of tensors)
    labels: torch.Tensor | None = None
    indices: torch.Tensor | None = None  # dataset indices of this step's samples (this process's share)
    outputs: torch.Tensor | None = None
    loss: torch.Tensor | None = None


class Callback:
    """Hooks into :func:`compress.finetune`; override what you need."""

    def parameters(self) -> Iterable[nn.Parameter]:
        """Trainable tensors the callback owns (e.g. distillation projections): the loop optimises
        them with the model (and all-reduces their gradients under DDP). Asked once, before training."""
        return ()

    def on_train_start(self, state: TrainState) -> None: ...

    def before_step(self, state: TrainState) -> None: ...

    def task_loss_weight(self, state: TrainState) -> float:
        """Factor on the loop's task loss (labels): distillation mixes it with ``1 - alpha``."""
        return 1.0

    def extra_loss(self, state: TrainState) -> torch.Tensor | None:
        """A term added to the loss of this step (e.g. distillation); ``None`` for nothing."""
        return None

    def after_step(self, state: TrainState) -> None:
        """Called after ``optimizer.step()`` (e.g. to re-apply sparsity masks)."""

    def on_epoch_end(self, state: TrainState) -> None: ...

    def epoch_log(self) -> dict[str, float]:
        """Figures added to this epoch's history entry (called after ``on_epoch_end``)."""
        return {}

    def epoch_is_result(self, state: TrainState) -> bool:
        """False while the weights are not yet a finished result (a pruning schedule still ramping up):
        ``keep_best`` then does not pick this epoch."""
        return True

    def on_train_end(self, state: TrainState) -> None:
        """Always called once training stops, also when it stops with an error (remove hooks here)."""
