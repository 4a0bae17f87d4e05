"""What QAT adds to a fine-tune: weight ranges that follow the weights, and optional BN freezing."""

from __future__ import annotations

from compress.callbacks import Callback, TrainState
from compress.quant import refresh_weight_amax
from compress.quant.layers import BATCHNORMS


class QatCallback(Callback):
    """Keeps each weight quantizer's per-channel range at the current max |w| after every step, and
    from epoch ``freeze_bn_after`` (0-based) on runs BatchNorm on its running statistics and stops
    updating them, so the statistics folded into the exported convolutions stop moving."""

    def __init__(self, freeze_bn_after: int | None = None) -> None:
        self.freeze_bn_after = freeze_bn_after

    def on_train_start(self, state: TrainState) -> None:
        refresh_weight_amax(state.model)

    def before_step(self, state: TrainState) -> None:
        if self.freeze_bn_after is not None and state.epoch >= self.freeze_bn_after:
            for m in state.model.modules():
                if isinstance(m, BATCHNORMS) and m.training:
                    m.eval()

    def after_step(self, state: TrainState) -> None:
        refresh_weight_amax(state.model)
