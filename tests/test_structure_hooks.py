"""The per-kind hooks of compress.structure: what the core asks instead of importing a kind's package."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compress
from compress import structure


def _sparse_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    compress.sparsity.apply_2to4(model)
    return model


def test_has_and_callbacks_follow_the_recorded_kinds():
    dense = nn.Sequential(nn.Linear(16, 8))
    assert not structure.has(dense, "sparsity") and structure.callbacks(dense) == []
    model = _sparse_model()
    assert structure.has(model, "sparsity") and not structure.has(model, "quant")
    (keep,) = structure.callbacks(model)
    with torch.no_grad():
        model[0].weight.fill_(1.0)  # an optimizer step would move masked weights like this
    keep.after_step(compress.callbacks.TrainState(model))
    # 2 of every 4 input weights per output row stay: exactly half of the 16 x 16 weights are zero again.
    assert int((model[0].weight == 0).sum()) == 16 * 16 // 2


def test_verify_runs_the_kinds_check():
    model = _sparse_model()
    structure.verify(model, "x.pt")
    with torch.no_grad():
        model[2].weight.fill_(1.0)
    with pytest.raises(compress.CheckpointError, match="checkpoint x.pt: layer '2' has nonzero weights where"):
        structure.verify(model, "x.pt")


def test_hooks_need_a_registered_kind_and_are_registered_once():
    with pytest.raises(ValueError, match="kind 'nosuchkind' has no rebuild registered"):
        structure.register_verify("nosuchkind")(lambda model, source: None)
    with pytest.raises(ValueError, match="a callbacks hook for structure kind 'sparsity' is already registered"):
        structure.register_callbacks("sparsity")(lambda model: [])
