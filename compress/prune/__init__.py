"""Pruning: L1 unstructured (masks) and dependency-aware channel pruning (smaller models).

    pruner = compress.prune.l1_unstructured(model, ratio=0.8)           # call pruner.step() after opt.step()
    model = compress.prune.channels(model, example_input, ratio=0.5)     # physically fewer channels
    found = compress.prune.channels(model, example_input, latency=0.5)   # pruned until the engine runs 2x faster
"""

from compress.prune import plan  # noqa: F401  (registers the checkpoint rebuild)
from compress.prune.channel import ChannelOptions, ChannelPruner, Importance, channels
from compress.prune.engine_timer import Engine, Int8
from compress.prune.heads import HeadOptions
from compress.prune.latency_search import Candidate, LatencySearch, Timing
from compress.prune.latency_target import Backend, LatencyTarget, engine_multiple
from compress.prune.schedule import Curve, Schedule
from compress.prune.unstructured import MagnitudePruner, Scope, l1_unstructured, magnitude_masks

__all__ = [
    "Backend",
    "Candidate",
    "ChannelOptions",
    "ChannelPruner",
    "Curve",
    "Engine",
    "HeadOptions",
    "Importance",
    "Int8",
    "LatencySearch",
    "LatencyTarget",
    "MagnitudePruner",
    "Schedule",
    "Scope",
    "Timing",
    "channels",
    "engine_multiple",
    "l1_unstructured",
    "magnitude_masks",
]
