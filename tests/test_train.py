"""The shared fine-tune loop: callbacks, best-epoch restore, schedules, AMP, missing labels."""

import math

import pytest
import torch
from torch.utils.data import TensorDataset

import compress
from compress.data import build_loader, make_loader
from compress.errors import DataError
from compress.recipe import DigitsData
from compress.train import Callback, FinetuneConfig, ScheduleKind, _lr_factor, finetune


@pytest.fixture(scope="module")
def digits():
    train = build_loader(DigitsData(source="digits", split="train", batch_size=128), "train", train=True)
    test = build_loader(DigitsData(source="digits", split="test", batch_size=360), "eval")
    return train, test


def _accuracy(model, loader):
    x, y = next(iter(loader))
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


class ZeroFirstRow(Callback):
    """A mask re-applied after every optimizer step, plus an extra loss term: what sparsity/KD stages do."""

    def __init__(self):
        self.steps = 0
        self.extra_calls = 0

    def on_train_start(self, state):
        with torch.no_grad():
            state.model[1].weight[0].zero_()

    def extra_loss(self, state):
        self.extra_calls += 1
        return 0.0 * state.outputs.sum()

    def after_step(self, state):
        self.steps += 1
        with torch.no_grad():
            state.model[1].weight[0].zero_()


def test_callbacks_run_every_step_and_masks_survive_training(digits):
    train, test = digits
    torch.manual_seed(0)
    model = compress.build("compress.zoo:digits_mlp")
    cb = ZeroFirstRow()
    finetune(model, train, FinetuneConfig(epochs=5, lr=0.1), callbacks=[cb], progress=False)
    assert cb.steps == cb.extra_calls == 5 * math.ceil(1437 / 128)  # the loader as given: its last partial batch too
    assert torch.count_nonzero(model[1].weight[0]) == 0
    assert _accuracy(model, test) > 0.85


def test_keep_best_restores_the_best_epoch(digits):
    train, _ = digits
    torch.manual_seed(0)
    model = compress.build("compress.zoo:digits_mlp")
    snapshots = []

    class Snapshot(Callback):
        def on_epoch_end(self, state):
            snapshots.append({k: v.clone() for k, v in state.model.state_dict().items()})

    scores = iter([0.5, 0.9, 0.1])
    result = finetune(model, train, FinetuneConfig(epochs=3, lr=0.05), evaluate=lambda m: next(scores),
                      callbacks=[Snapshot()], progress=False)
    assert result.best_epoch == 2 and result.best_score == 0.9
    assert [h["score"] for h in result.history] == [0.5, 0.9, 0.1]
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshots[1][key])
    assert not torch.equal(model[1].weight, snapshots[2]["1.weight"])


def test_keep_best_prefers_the_later_of_equal_scores(digits):
    """A saturated val split (every epoch 1.0) keeps the model trained longest."""
    train, _ = digits
    torch.manual_seed(0)
    model = compress.build("compress.zoo:digits_mlp")
    scores = iter([1.0, 1.0, 0.9])
    result = finetune(model, train, FinetuneConfig(epochs=3, lr=0.05), evaluate=lambda m: next(scores),
                      progress=False)
    assert result.best_epoch == 2 and result.best_score == 1.0


def test_schedules():
    cos = _lr_factor(FinetuneConfig(epochs=4, schedule=ScheduleKind.cosine), steps_per_epoch=10)
    assert cos(0) == 1.0 and cos(20) == pytest.approx(0.5) and cos(40) == pytest.approx(0.0, abs=1e-12)
    step = _lr_factor(FinetuneConfig(epochs=6, schedule="step", step_size=2, gamma=0.1), steps_per_epoch=10)
    assert [step(s) for s in (0, 19, 20, 40, 59)] == pytest.approx([1, 1, 0.1, 0.01, 0.01])
    const = _lr_factor(FinetuneConfig(epochs=3, schedule="constant"), steps_per_epoch=5)
    assert const(0) == const(14) == 1.0


def test_adamw_with_amp_on_cpu_learns(digits):
    train, test = digits
    torch.manual_seed(0)
    model = compress.build("compress.zoo:digits_cnn", {"width": 8})
    before = _accuracy(model, test)
    result = finetune(model, train, FinetuneConfig(epochs=4, lr=1e-2, optimizer="adamw", amp=True), progress=False)
    assert all(math.isfinite(h["loss"]) for h in result.history)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert _accuracy(model, test) > max(before, 0.85)


def test_unlabeled_data_without_a_loss_is_refused():
    x = torch.randn(32, 1, 8, 8)
    loader = make_loader(TensorDataset(x), "data.train", batch_size=16)
    model = compress.build("compress.zoo:digits_mlp")
    with pytest.raises(DataError, match="no labels and no callback provides a loss"):
        finetune(model, loader, FinetuneConfig(epochs=1), progress=False)
