"""Pruning: L1 unstructured (masks) and dependency-aware channel pruning (smaller models).

    pruner = compress.prune.l1_unstructured(model, ratio=0.8)           # call pruner.step() after opt.step()
    model = compress.prune.channels(model, example_input, ratio=0.5)     # physically fewer channels
"""

from compress.prune import plan  # noqa: F401  (registers the checkpoint rebuild)
from compress.prune.channel import ChannelOptions, ChannelPruner, Importance, channels
from compress.prune.heads import HeadOptions
from compress.prune.schedule import Curve, Schedule
from compress.prune.unstructured import MagnitudePruner, Scope, l1_unstructured, magnitude_masks

__all__ = [
    "ChannelOptions",
    "ChannelPruner",
    "Curve",
    "HeadOptions",
    "Importance",
    "MagnitudePruner",
    "Schedule",
    "Scope",
    "channels",
    "l1_unstructured",
    "magnitude_masks",
]
