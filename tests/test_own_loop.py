"""The Python API in a user's own loop: 2:4 masks and weight ranges kept by the model itself, save = load's
checks, save without a factory, restore onto a model the user builds, finetune respecting its inputs."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import compress
from compress import checkpoint, sparsity, zoo
from compress.errors import CheckpointError
from compress.quant import quant_layers


def _digits(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    from compress.data import build_loader
    from compress.recipe import DigitsData

    return next(iter(build_loader(DigitsData(source="digits", split="train", batch_size=n), "train", train=False)))


class Net(nn.Module):
    """A user's model whose class needs an argument: no factory can be recorded for it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(width, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _break_masks(model: nn.Module, layer: str) -> None:
    weight = model.get_submodule(layer).weight
    weight.data[weight.data == 0] = 0.5  # through .data: past every hook, as other code might


def test_masks_survive_deepcopy_prepare_and_a_users_loop_with_a_new_optimizer_and_save_refuses_broken_ones(tmp_path):
    torch.manual_seed(0)
    x, y = _digits()
    model = compress.build("compress.zoo:digits_cnn")  # so compress.load can rebuild it, and compare messages
    layers = list(sparsity.apply_2to4(model, example_input=x[:1]).layers)
    assert len(layers) >= 3
    qmodel = compress.quant.prepare(copy.deepcopy(model), target="tensorrt")
    compress.ptq.calibrate(qmodel, [(x, y)], progress=False)
    before = {n: qmodel.get_submodule(n).weight.detach().clone() for n in layers}
    # a new optimizer the library never saw, with momentum and weight decay (which move any weight they reach)
    _train(qmodel, torch.optim.SGD(qmodel.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01), x, y, steps=4)
    # checked right after optimizer.step(), no forward since: masked gradients kept the zeros
    assert sparsity.verify_model(qmodel).sparse_layers == layers
    assert all(not torch.equal(qmodel.get_submodule(n).weight, before[n]) for n in layers)  # it trained
    # AdamW on a deep copy of the quantized model: the copy's layers keep their masks too
    qcopy = copy.deepcopy(qmodel)
    assert sparsity.sparse_layers(qcopy) == layers  # the record travels with the copy (a checkpoint of it keeps it)
    _train(qcopy, torch.optim.AdamW(qcopy.parameters(), lr=0.01, weight_decay=0.1), x, y, steps=3)
    assert sparsity.verify_model(qcopy).sparse_layers == layers
    # weight ranges followed the weights without a callback: exactly max |w| per output channel
    qcopy.eval()
    qcopy(x[:1])
    for name, layer in quant_layers(qcopy):
        amax = layer.weight.detach().abs().flatten(1).amax(1)
        assert torch.equal(layer.weight_quantizer.amax, torch.where(amax > 0, amax, torch.ones_like(amax))), name
    compress.save(qmodel, tmp_path / "good.pt")
    assert torch.equal(compress.load(tmp_path / "good.pt").eval()(x), qmodel.eval()(x))

    # masks broken past the hooks: save refuses with load's own message, and writes nothing
    _break_masks(qmodel, layers[0])
    with pytest.raises(CheckpointError) as saving:
        compress.save(qmodel, tmp_path / "broken.pt")
    assert not (tmp_path / "broken.pt").exists()
    raw = torch.load(tmp_path / "good.pt", weights_only=True)  # the same break, in a file other code wrote
    raw["state_dict"] = {k: v.clone() for k, v in raw["state_dict"].items()}
    key = f"{layers[0]}.weight"
    raw["state_dict"][key][raw["state_dict"][key] == 0] = 0.5
    raw["weights_sha256"] = checkpoint.weights_digest(raw["state_dict"])
    torch.save(raw, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError) as loading:
        compress.load(tmp_path / "edited.pt")
    said = str(saving.value).replace(str(tmp_path / "broken.pt"), "PATH")
    assert said == str(loading.value).replace(str(tmp_path / "edited.pt"), "PATH")
    assert "\n" not in said and layers[0] in said and "2:4 mask" in said


def test_masks_survive_state_dict_load_and_export_as_plain_initializers(tmp_path):
    torch.manual_seed(0)
    x, y = _digits()
    model = zoo.DigitsCNN()
    layers = list(sparsity.apply_2to4(model).layers)
    dense = zoo.DigitsCNN().state_dict()
    model.load_state_dict(dense)  # dense weights loaded into the sparse model: its next forward masks them
    model.eval()(x[:1])
    assert sparsity.verify_model(model).sparse_layers == layers
    info = compress.export.onnx(model, x[:1], tmp_path / "m.onnx")
    assert sparsity.verify_onnx(info.path).sparse_layers == layers  # read from the initializers themselves


def test_qat_and_2to4_in_a_plain_loop_restored_onto_a_model_the_user_builds_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    x, y = _digits()
    model = Net(width=16)
    layers = list(sparsity.apply_2to4(model).layers)
    qmodel = compress.quant.prepare(model, target="onnxruntime")
    compress.ptq.calibrate(qmodel, [(x, y)], progress=False)
    _train(qmodel, torch.optim.Adam(qmodel.parameters(), lr=0.01), x, y, steps=3)
    compress.save(qmodel, tmp_path / "net.pt")  # Net needs an argument: no factory is recorded, and none needed
    assert torch.load(tmp_path / "net.pt", weights_only=True)["factory"] == ""
    with pytest.raises(CheckpointError, match=r"records no factory.*compress\.restore\(model, path\)"):
        compress.load(tmp_path / "net.pt")
    restored = compress.restore(Net(width=16), tmp_path / "net.pt")
    assert sparsity.sparse_layers(restored) == layers and compress.quant.target_of(restored).value == "onnxruntime"
    qmodel.eval()
    restored.eval()
    with torch.no_grad():
        assert torch.equal(qmodel(x), restored(x))  # bit for bit: same structure, weights and ranges
    # the restored model trains on and keeps its masks, and saves again
    _train(restored, torch.optim.SGD(restored.parameters(), lr=0.05, momentum=0.9), x, y, steps=2)
    assert sparsity.verify_model(restored).sparse_layers == layers
    compress.save(restored, tmp_path / "again.pt")
    # a model of another shape, or one already compressed, is refused in one line
    with pytest.raises(CheckpointError, match="does not fit"):
        compress.restore(Net(width=8), tmp_path / "net.pt")
    with pytest.raises(compress.CompressError, match="freshly built"):
        compress.restore(restored, tmp_path / "net.pt")


def test_save_records_the_factory_when_it_knows_it(tmp_path):
    torch.manual_seed(0)
    x, _ = _digits(8)
    built = compress.build("compress.zoo:digits_cnn", {"width": 16})  # compress knows how it was built
    compress.save(built, tmp_path / "built.pt")
    assert torch.equal(compress.load(tmp_path / "built.pt").eval()(x), built.eval()(x))
    own = zoo.DigitsCNN(width=16)  # the class alone does not say width=16: no factory is guessed
    compress.save(own, tmp_path / "own.pt")
    assert torch.load(tmp_path / "own.pt", weights_only=True)["factory"] == ""
    assert torch.equal(compress.restore(zoo.DigitsCNN(width=16), tmp_path / "own.pt").eval()(x), own.eval()(x))


def test_finetune_uses_the_users_loader_as_given_and_restores_the_mode():
    torch.manual_seed(0)
    x, y = _digits(10)
    seen: list[int] = []

    def collate(items):  # the user's own collate: it must be what batches the data
        seen.append(len(items))
        return torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])

    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, collate_fn=collate)
    for training in (True, False):
        model = zoo.DigitsCNN(width=8)
        model.train(training)
        seen.clear()
        compress.finetune(model, loader, compress.FinetuneConfig(epochs=2, lr=0.01), progress=False)
        assert seen == [4, 4, 2] * 2  # every sample each epoch: the last partial batch is kept
        assert model.training is training
    with pytest.raises(compress.CompressError, match="batch_size is 8 but the DataLoader's is 4"):
        compress.finetune(zoo.DigitsCNN(width=8), loader, compress.FinetuneConfig(batch_size=8), progress=False)


def test_under_ddp_only_the_sampler_of_the_users_loader_is_wrapped():
    from compress.train import _as_given

    x, y = torch.arange(10.0).reshape(10, 1), torch.zeros(10, dtype=torch.long)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    assert _as_given(loader, compress.FinetuneConfig(), seed=0, rank=0, world_size=1, distributed=False) is loader
    shares = [_as_given(loader, compress.FinetuneConfig(), seed=0, rank=r, world_size=2, distributed=True)
              for r in range(2)]
    seen = [sorted(int(v) for b, _ in share for v in b.flatten()) for share in shares]
    assert all(share.batch_size == 4 for share in shares)  # the user's per-process batch size
    assert len(seen[0]) == len(seen[1]) == 5 and sorted(seen[0] + seen[1]) == list(range(10))  # nothing dropped


@pytest.mark.slow
def test_qat_sparse_example_trains_in_a_plain_loop_and_restores_onto_a_fresh_torchvision_model(tmp_path):
    """examples/qat_sparse_own_loop.py runs as its docstring shows (kept here, next to the API it shows)."""
    root = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, str(root / "examples/qat_sparse_own_loop.py"), "--steps", "6",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    losses = [float(v) for v in re.findall(r"step \d+ loss ([0-9.]+)", proc.stdout)]
    assert len(losses) == 2 and losses[1] < losses[0]  # it trained
    assert "sparse layers 19/19 after training" in proc.stdout  # resnet18: every eligible conv kept 2:4
    assert "identical outputs True" in proc.stdout
    assert re.search(r"tensorrt rules pass, 19 2:4 layers", proc.stdout), proc.stdout
    assert (tmp_path / "qat_sparse.pt").is_file() and (tmp_path / "qat_sparse.onnx").is_file()
