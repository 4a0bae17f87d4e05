"""EngineTimer: models timed against the unpruned engine, one at a time or all taking turns in the same runs."""

from __future__ import annotations

import copy

import torch
import torchvision

import compress
from compress.prune import Engine
from compress.prune.engine_timer import EngineTimer


def test_finished_models_are_timed_together_against_the_unpruned_engine(tmp_path) -> None:
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18(num_classes=10).eval(), torch.randn(2, 3, 32, 32)
    half = compress.prune.channels(copy.deepcopy(model), x, ratio=0.5)
    with EngineTimer(model, x, Engine(), 8, workdir=tmp_path, repeats=3, rounds=3) as timer:
        same, pruned = timer.together([copy.deepcopy(model), half])
        alone = timer(half)
    for t in (same, pruned, alone):
        assert len(t.runs) == 3 and t.low <= t.ratio <= t.high and t.ms > 0
    assert same.unpruned_ms == pruned.unpruned_ms  # one unpruned engine, timed in the same rounds as both
    # resnet18 at half its channels runs in about a third of the time, an identical engine in the same time: the
    # bounds leave a factor of 2 for load from elsewhere, which paired rounds hit both engines of alike
    assert pruned.ratio < 0.6 and 0.5 < same.ratio < 2.0
    assert alone.ratio < 0.6
    assert not list(tmp_path.iterdir())  # the engines' files are gone
