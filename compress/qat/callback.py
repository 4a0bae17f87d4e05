"""What QAT adds to a fine-tune: optional BN freezing (weight ranges follow the weights by themselves)."""

from __future__ import annotations

from compress.callbacks import Callback, TrainState
from compress.quant import refresh_weight_amax
from compress.quant.layers import BATCHNORMS


class QatCallback(Callback):
    """From epoch ``freeze_bn_after`` (0-based) on, runs BatchNorm on its running statistics and stops
    updating them, so the statistics folded into the exported convolutions stop moving.

    Weight quantizer ranges need no callback: each quantized layer keeps its range at max |w| of its
    current weight itself (:mod:`compress.quant.layers`), in this loop or a user's own. The callback
    still sets them at the start, which names a weight that holds NaN or Inf before any step runs."""

    def __init__(self, freeze_bn_after: int | None = None) -> None:
        self.freeze_bn_after = freeze_bn_after

    def on_train_start(self, state: TrainState) -> None:
        refresh_weight_amax(state.model)

    def before_step(self, state: TrainState) -> None:
        if self.freeze_bn_after is not None and state.epoch >= self.freeze_bn_after:
            for m in state.model.modules():
                if isinstance(m, BATCHNORMS) and m.training:
                    m.eval()
