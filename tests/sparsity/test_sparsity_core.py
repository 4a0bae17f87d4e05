"""2:4 sparsity core: the mask layout, codes, permutation search and surgery, persistence, verification."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn
from torch.utils.data import TensorDataset

import compress
from compress import sparsity, zoo
from compress.checkpoint import weights_digest
from compress.errors import CompressError
from compress.sparsity import pattern
from compress.sparsity.masks import SparseMasks
from compress.sparsity.permute import permute_groups, search


def _digits_batch(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    from compress.data import build_loader
    from compress.recipe import DigitsData

    x, y = next(iter(build_loader(DigitsData(source="digits", split="train", batch_size=n), "train", train=False)))
    return x, y


def test_mask_keeps_two_of_four_input_channels_per_output_channel_and_kernel_position():
    w = torch.zeros(1, 8, 1, 2)  # [out, in, kh, kw]: groups run along `in`, separately per kw
    w[0, :4, 0, 0] = torch.tensor([1.0, -4.0, 3.0, 2.0])
    w[0, :4, 0, 1] = torch.tensor([4.0, 3.0, -2.0, 1.0])
    w[0, 4:, 0, 0] = torch.tensor([0.5, 0.5, 0.5, 0.5])  # ties: the earlier weights stay
    w[0, 4:, 0, 1] = torch.tensor([0.0, 0.0, 0.0, 7.0])
    keep = pattern.mask_2to4(w)
    assert keep[0, :, 0, 0].tolist() == [False, True, True, False, True, True, False, False]
    assert keep[0, :, 0, 1].tolist() == [True, True, False, False, True, False, False, True]
    assert int(keep.sum()) == w.numel() // 2
    linear = torch.tensor([[1.0, 2.0, 3.0, 4.0, -9.0, 0.1, 0.2, 8.0]])
    assert pattern.mask_2to4(linear).tolist() == [[False, False, True, True, True, False, False, True]]
    assert pattern.retained(linear) == pytest.approx((3 + 4 + 9 + 8) / linear.abs().sum().item())


def test_codes_round_trip_and_reject_what_does_not_fit():
    torch.manual_seed(0)
    w = torch.randn(16, 32, 3, 3)
    keep = pattern.mask_2to4(w)
    codes = pattern.encode(keep)
    assert codes.dtype == torch.uint8 and codes.numel() == w.numel() // 4
    assert torch.equal(pattern.decode(codes, w), keep)
    with pytest.raises(ValueError, match="do not fit"):
        pattern.decode(codes, torch.zeros(16, 16, 3, 3))
    with pytest.raises(ValueError, match="exactly 2"):
        pattern.encode(torch.ones(4, 8, dtype=torch.bool))


def test_satisfies_counts_violating_groups():
    w = torch.randn(8, 16)
    sparse = w * pattern.mask_2to4(w)
    assert pattern.satisfies(sparse) and pattern.violations(sparse) == 0
    sparse[3, 5] = sparse[3, 4] = 1.0  # three nonzeros in group 1 of row 3 (at most; one may already be kept)
    sparse[3, 6] = 1.0
    assert not pattern.satisfies(sparse) and pattern.violations(sparse) == 1
    assert not pattern.satisfies(torch.zeros(4, 6))  # the input dim must divide by 4


def test_search_reaches_the_unstructured_bound_where_it_is_reachable():
    mags = torch.tensor([[9.0, 9.0, 9.0, 9.0, 1.0, 1.0, 1.0, 1.0]])  # as is: 18 + 2 kept of 40
    order, swaps = search(mags)
    assert sorted(order.tolist()) == list(range(8)) and swaps >= 1
    kept = mags[:, order].reshape(-1, 4).sort(dim=1, descending=True).values[:, :2].sum()
    assert float(kept) == 36.0  # two 9s in each group: the best any 50% mask can do


def test_search_never_loses_magnitude_and_recovers_part_of_the_gap():
    torch.manual_seed(0)
    mags = torch.randn(288, 64).abs() * torch.rand(1, 64)  # channels of different scales, like trained layers

    def kept(order: torch.Tensor) -> float:
        return float(mags[:, order].reshape(288, -1, 4).sort(dim=2, descending=True).values[..., :2].sum())

    plain = kept(torch.arange(64))
    permuted = kept(search(mags)[0])
    unstructured = float(mags.flatten().sort(descending=True).values[: mags.numel() // 2].sum())
    assert plain < permuted <= unstructured
    assert (permuted - plain) / (unstructured - plain) > 0.2


def test_permutation_keeps_the_function_and_raises_retained_magnitude():
    torch.manual_seed(0)
    model = zoo.digits_cnn().eval()
    x, _ = _digits_batch()
    with torch.no_grad():
        for m in model.modules():  # non-trivial BatchNorm statistics, so a mis-permuted entry shows
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
        before = model(x)
    sparse = {"layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2", "layer2.shortcut.0"}
    results = permute_groups(model, x[:2], sparse, "test")
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-5)
    assert {r.root for r in results} == {"stem.0", "layer1.conv1", "layer2.conv1"}  # layer2's output feeds fc only
    stem = next(r for r in results if r.root == "stem.0")
    assert set(stem.consumers) == {"layer1.conv1", "layer2.conv1", "layer2.shortcut.0"}  # residual: one order
    assert all(r.skipped is None and r.swaps > 0 for r in results)  # every group reordered, none undone
    for r in results:  # each group's layers keep more together
        assert sum(v["after"] - v["before"] for v in r.layers.values()) > 0


class Mixed(nn.Module):
    """A concat, a grouped conv, a Linear after flatten: permutation must follow or skip each."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 16, 3, padding=1)
        self.b = nn.Conv2d(1, 16, 3, padding=1)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.mix = nn.Conv2d(32, 32, 1)
        self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.fc = nn.Linear(16 * 16 * 16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(torch.cat([self.a(x), self.b(x)], 1))
        y = torch.relu(self.mix(self.grouped(y)))
        return self.head(torch.relu(self.fc(self.up(y).flatten(1))))


def test_eligibility_reasons_and_permutation_skips_on_an_awkward_model():
    torch.manual_seed(0)
    model = Mixed().eval()
    x = torch.randn(4, 1, 8, 8)
    before = model(x).detach()
    result = sparsity.apply_2to4(model, example_input=x[:1], permute=True)
    assert set(result.layers) == {"mix", "fc"}
    assert result.skipped == {
        "a": "input channels 1 are not a multiple of 16",
        "b": "input channels 1 are not a multiple of 16",
        "grouped": "grouped conv (groups=4)",
        "up": "ConvTranspose2d: sparse kernels run Conv and Linear only",
        "head": "output channels 10 are not a multiple of 8",
    }
    assert result.estimate["eligible_layers"] == 2 and 0 < result.estimate["eligible_macs_share"] < 1
    groups = {p["root"]: p for p in result.permutations}
    assert "grouped conv 'grouped'" in groups["grouped"].get("skipped", "")  # feeds mix: cannot reorder
    masked = model(x).detach()
    assert not torch.allclose(masked, before)  # masks changed weights...
    assert all(pattern.satisfies(model.get_submodule(n).weight) for n in ("mix", "fc"))


def test_finetune_and_a_users_optimizer_keep_the_masks():
    torch.manual_seed(0)
    model = zoo.digits_cnn()
    x, y = _digits_batch()
    sparse = sparsity.apply_2to4(model, example_input=x[:1], permute=True)
    zeros = {n: model.get_submodule(n).weight == 0 for n in sparse.layers}
    start = {n: model.get_submodule(n).weight.detach().clone() for n in sparse.layers}
    compress.finetune(model, TensorDataset(x, y), compress.FinetuneConfig(epochs=2, lr=0.1, batch_size=16, keep_best=False),
                      progress=False)
    for name, zero in zeros.items():
        weight = model.get_submodule(name).weight
        assert bool((weight[zero] == 0).all()) and pattern.satisfies(weight)
        assert not torch.equal(weight, start[name])  # it trained
    # a plain loop: the model keeps its masks itself, also once the optimizer hook is gone
    model2 = zoo.digits_cnn()
    opt = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    handle = sparsity.apply_2to4(model2, opt)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model2(x), y).backward()
        opt.step()
    assert sparsity.verify_model(model2).sparse_layers == list(handle.layers)
    handle.remove()
    opt.step()  # momentum built from masked gradients is zero where the mask is: nothing moves there
    assert sparsity.verify_model(model2).sparse_layers == list(handle.layers)
    sparsity.enforce.remove(model2)  # without the model's own hooks, a step moves masked weights again
    opt.zero_grad()
    F.cross_entropy(model2(x), y).backward()
    opt.step()
    assert sparsity.verify_model(model2).sparse_layers == []


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_qat_keeps_2to4_in_the_exported_int8_weights(target, tmp_path):
    torch.manual_seed(0)
    model = zoo.digits_cnn()
    x, y = _digits_batch(128)
    sparse = sparsity.apply_2to4(model, example_input=x[:1])
    qmodel = compress.quant.prepare(model, target=target)
    compress.ptq.calibrate(qmodel, [(x, y)])
    assert sparsity.sparse_layers(qmodel) == list(sparse.layers)  # the record follows the traced model
    compress.finetune(qmodel, TensorDataset(x, y), compress.FinetuneConfig(epochs=2, lr=0.05, batch_size=32, keep_best=False),
                      callbacks=[compress.qat.QatCallback()], progress=False)
    assert sparsity.verify_model(qmodel).sparse_layers == list(sparse.layers)
    path = tmp_path / "q.onnx"
    compress.export.onnx(qmodel, x[:1], path, target=target)
    check = sparsity.verify_onnx(path)
    assert check.sparse_layers == list(sparse.layers)  # int8 initializers, dequantized, are 2:4
    assert check.layers["stem.0"].ineligible and not check.layers["fc"].sparse

    # plant a violation in one int8 weight: the verifier names that layer
    proto = onnx.load(str(path))
    init = next(t for t in proto.graph.initializer if t.name == "layer2.conv1.weight_quantized")
    values = numpy_helper.to_array(init).copy()
    values.reshape(values.shape[0], values.shape[1], -1)[0, :4, 0] = np.array([5, 5, 5, 5], dtype=values.dtype)
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(proto, str(tmp_path / "broken.onnx"))
    broken = sparsity.verify_onnx(tmp_path / "broken.onnx")
    assert broken.missing(list(sparse.layers)) == ["layer2.conv1"]
    assert broken.layers["layer2.conv1"].violations == 1


def test_checkpoints_keep_the_masks_through_quantization(tmp_path):
    torch.manual_seed(0)
    model = compress.build("compress.zoo:digits_cnn", {})
    x, y = _digits_batch()
    sparsity.apply_2to4(model, example_input=x[:1], permute=True)
    qmodel = compress.quant.prepare(model, target="tensorrt")
    compress.ptq.calibrate(qmodel, [(x, y)])
    compress.save(qmodel, tmp_path / "q.pt")
    loaded = compress.load(tmp_path / "q.pt")
    torch.testing.assert_close(loaded.eval()(x), qmodel.eval()(x), atol=0.0, rtol=0.0)
    assert sparsity.sparse_layers(loaded) == sparsity.sparse_layers(qmodel)
    want, got = SparseMasks(qmodel), SparseMasks(loaded)
    assert all(torch.equal(want.masks[n], got.masks[n]) for n in want.masks)
    compress.finetune(loaded, TensorDataset(x, y), compress.FinetuneConfig(epochs=1, lr=0.1, batch_size=16), progress=False)
    assert len(sparsity.verify_model(loaded).sparse_layers) == 5  # a reloaded model keeps 2:4 when trained


def test_bad_uses_are_refused_with_one_line():
    x, _ = _digits_batch(2)
    model = zoo.digits_cnn()
    with pytest.raises(CompressError, match="permute needs example_input"):
        sparsity.apply_2to4(model, permute=True)
    sparsity.apply_2to4(model)
    with pytest.raises(CompressError, match="already 2:4 sparse"):
        sparsity.apply_2to4(model)
    qmodel = compress.quant.prepare(zoo.digits_cnn(), target="tensorrt")
    with pytest.raises(CompressError, match="sparsify before quantizing"):
        sparsity.apply_2to4(qmodel)
    with pytest.raises(CompressError, match=r"no layer can be 2:4 sparse \(1: output channels 12"):
        sparsity.apply_2to4(zoo.digits_mlp(hidden=12))
    with pytest.raises(CompressError, match="matches no"):
        sparsity.apply_2to4(zoo.digits_cnn(), include=["nope*"])
    with pytest.raises(CompressError, match="2:4 sparse; channel pruning would break its masks"):
        compress.prune.channels(model, x, ratio=0.25)
    masks = SparseMasks(model)
    model.layer1.conv1.weight = nn.Parameter(torch.randn(8, 32, 3, 3))  # resized behind our back: said, not ignored
    with pytest.raises(CompressError, match="mask of layer 'layer1.conv1' no longer fits it"):
        SparseMasks(model)
    assert masks.masks  # the earlier binding is untouched


def test_damaged_or_tampered_checkpoints_are_refused(tmp_path):
    x, _ = _digits_batch(2)
    model = compress.build("compress.zoo:digits_cnn", {})
    sparsity.apply_2to4(model, example_input=x)
    compress.save(model, tmp_path / "ok.pt")
    good = torch.load(tmp_path / "ok.pt", weights_only=True)

    def refused(change, message: str) -> None:
        obj = copy.deepcopy(good)
        change(obj)
        torch.save(obj, tmp_path / "bad.pt")
        with pytest.raises(compress.CheckpointError, match=message):
            compress.load(tmp_path / "bad.pt")

    def entry(obj):  # the sparsity record
        return next(e for e in obj["structure"] if e["kind"] == "sparsity")["payload"]

    def perturb(obj, rehash: bool = True):
        obj["state_dict"]["layer2.conv2.weight"] += 0.01
        if rehash:  # written by other code: a consistent hash, weights that break the masks
            obj["weights_sha256"] = weights_digest(obj["state_dict"])

    refused(perturb, "layer 'layer2.conv2' has nonzero weights where its 2:4 mask is zero")
    refused(lambda obj: perturb(obj, rehash=False), "weights changed since saved")
    refused(lambda obj: entry(obj).update(layers=["layer1.conv1"]),
            r"'structure\[0\].payload.layers' \(sparsity\): Input should be a valid dictionary")
    refused(lambda obj: entry(obj)["layers"].update({"layer1.conv1": entry(obj)["layers"]["layer1.conv1"].long()}),
            "mask of layer 'layer1.conv1' does not fit .*uint8")
    refused(lambda obj: entry(obj)["layers"].update({"nope": torch.zeros(4, dtype=torch.uint8)}),
            "layers.nope: the 2:4 masks name layer 'nope', which the factory model lacks")
    assert sparsity.is_sparse(compress.load(tmp_path / "ok.pt"))


def test_verifier_follows_transposed_weights_of_linear_layers_on_sequences(tmp_path):
    class Tokens(nn.Module):  # Linear on [N, L, C] exports as MatMul, behind a Transpose once quantized
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.head = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))).mean(1))

    torch.manual_seed(0)
    model, x = Tokens().eval(), torch.randn(8, 6, 32)
    sparsity.apply_2to4(model)
    for target in ("tensorrt", "onnxruntime"):
        qmodel = compress.quant.prepare(model, target=target)
        compress.ptq.calibrate(qmodel, [(x, torch.zeros(8, dtype=torch.long))])
        compress.export.onnx(qmodel, x[:1], tmp_path / f"{target}.onnx", target=target)
        check = sparsity.verify_onnx(tmp_path / f"{target}.onnx")
        assert check.sparse_layers == ["fc1", "fc2"], target
        assert check.missing(["fc1", "fc2"]) == [] and check.layers["head"].ineligible
    compress.export.onnx(model, x[:1], tmp_path / "float.onnx")
    assert sparsity.verify_onnx(tmp_path / "float.onnx").sparse_layers == ["fc1", "fc2"]


def test_semi_structured_path_says_why_it_cannot_run_here():
    why = sparsity.why_unavailable()
    if why is None:
        pytest.skip("a CUDA sm80+ GPU is present: the GPU test covers this path")
    assert "CUDA" in why or "sm" in why or "torch" in why
    with pytest.raises(CompressError, match="to_semi_structured: "):
        sparsity.to_semi_structured(zoo.digits_mlp())


@pytest.mark.skipif(sparsity.why_unavailable() is not None, reason=f"{sparsity.why_unavailable()}")
def test_semi_structured_linear_matches_dense_on_gpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 128), nn.ReLU(), nn.Linear(128, 10))
    sparsity.apply_2to4(model)
    model = model.half().cuda().eval()
    x = torch.randn(128, 256, device="cuda", dtype=torch.half)
    dense = model(x)
    converted = sparsity.to_semi_structured(model)
    assert converted["0"] == "sparse" and converted["2"] == "sparse" and converted["4"] != "sparse"
    torch.testing.assert_close(model(x), dense, atol=2e-2, rtol=2e-2)


def test_permuting_reorders_the_optimizers_state_with_the_weights():
    torch.manual_seed(0)
    model = zoo.digits_cnn()
    x, y = _digits_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for p in model.parameters():  # momentum equal to the weights: after the reorder it must still be
        opt.state[p]["momentum_buffer"].copy_(p.detach())
    result = sparsity.apply_2to4(model, opt, example_input=x[:1], permute=True)
    assert sum(p["swaps"] for p in result.permutations) > 0
    for name in ("stem.0", "stem.1", "layer1.conv1", "layer2.conv2", "layer2.shortcut.0"):
        for p in model.get_submodule(name).parameters(recurse=False):
            buf = opt.state[p]["momentum_buffer"]
            torch.testing.assert_close(buf * (p != 0) if name in result.layers else buf, p.detach(), msg=name)
