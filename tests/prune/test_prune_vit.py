"""Channel pruning of a torchvision ViT: heads and head dimensions, the embedding, MLP widths; plans, export."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers_recipes import read_report
from helpers_vit import CLASSES, HEADS, LAYERS, MLP, D, T, tiny_vit
from torch import nn

import compress
from compress import structure
from compress.errors import CompressError
from compress.profile import count_macs
from compress.prune import plan
from compress.prune.channel import OVERSHOOT
from compress.zoo import vit_tiny

# helpers_vit's sizes with 4 heads of 8: a quarter of the heads is one head
FACTORY, KWARGS = "compress.zoo:vit_tiny", {"hidden_dim": D, "num_heads": 4, "mlp_dim": MLP}
PATCH_IN = 3 * 8 * 8


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return vit_tiny(**KWARGS).eval()


def _attentions(model: nn.Module) -> list[nn.MultiheadAttention]:
    return [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]


def _macs_by_hand(width: int, heads: int, mlp: list[int]) -> int:
    """helpers_vit's count with a pruned embedding width, head count and per-block MLP widths."""
    block = [T * width * 3 * width + 2 * T * T * width + T * width * width + 2 * T * width * m for m in mlp]
    return width * 16 * PATCH_IN + sum(block) + width * CLASSES


def _kept(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Which rows of ``before`` survive in ``after`` (rows compared whole, so a row matches itself only)."""
    return [int(torch.nonzero((before == row).all(1)).flatten()[0]) for row in after]


def test_vit_pruned_to_2x_true_macs_runs_keeps_head_bookkeeping_reloads_and_exports(tmp_path) -> None:
    model, x = _vit(), torch.randn(2, 3, 32, 32)
    base = count_macs(model, x[:1])
    assert base == _macs_by_hand(D, HEADS, [MLP] * LAYERS)  # the attention matmuls are counted
    # a quarter of the heads go (4 -> 3), the embedding keeps 3 x 7 and the MLP widths take the rest
    compress.prune.channels(model, x[:1], macs_reduction=2.0, round_to=1, prune_num_heads=True,
                            head_pruning_ratio=0.25)
    width, mlp = model.conv_proj.out_channels, [b.mlp[0].out_features for b in model.encoder.layers]
    after = count_macs(model, x[:1])
    assert after == _macs_by_hand(width, 3, mlp) and 2.0 <= base / after < 2.0 * OVERSHOOT
    assert (width, mlp) == (21, [40, 40])
    # three heads of four left everywhere; every size that repeats it agrees: forward, export, INT8 rewrite work
    assert model.hidden_dim == width == model.class_token.shape[-1] == model.encoder.pos_embedding.shape[-1]
    for block, mha in zip(model.encoder.layers, _attentions(model), strict=True):
        assert (mha.num_heads, block.num_heads, mha.embed_dim, mha.head_dim) == (3, 3, width, 7)
        assert mha.in_proj_weight.shape == (3 * width, width) and mha.out_proj.weight.shape == (width, width)
    recorded = structure.origin_of(model).structure[-1]["payload"]["modules"]
    assert recorded["encoder.layers.encoder_layer_0.self_attention"]["attrs"]["num_heads"] == 3
    assert recorded[""]["attrs"]["hidden_dim"] == width
    # reload from the plan (weights_only, no pickle): the same module computes the same numbers
    compress.save(model, tmp_path / "vit.pt", factory=FACTORY, kwargs=KWARGS)
    loaded = compress.load(tmp_path / "vit.pt").eval()
    assert torch.equal(loaded(x), model(x))
    # opset 13 (explicit MatMul/Softmax attention): ONNX Runtime agrees to float rounding
    compress.export.onnx(loaded, x[:1], tmp_path / "vit.onnx", opset=13)
    session = ort.InferenceSession(str(tmp_path / "vit.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x[:1].numpy()})[0]
    want = model(x[:1]).detach().numpy()
    # float32 re-association over sums of <= 192 terms of |logit| ~ 1: far below 1e-4, far above a lost head
    np.testing.assert_allclose(got, want, atol=1e-4)
    qmodel = compress.quant.prepare(loaded, target="tensorrt")
    split = {n: m for n, m in qmodel.named_modules() if n.endswith(("q_proj", "out_proj"))}
    assert len(split) == 2 * LAYERS and all(m.weight.shape == (width, width) for m in split.values())
    compress.ptq.calibrate(qmodel, [torch.randn(8, 3, 32, 32)], method="max")
    compress.export.onnx(qmodel, x[:1], tmp_path / "int8.onnx", opset=13, target="tensorrt")


    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    fed = [n for n in matmuls if all(producers.get(i) == "DequantizeLinear" for i in n.input)]
    assert len(fed) >= 2 * LAYERS  # Q.Kt and softmax.V of every block take dequantized inputs


def test_removing_a_head_keeps_the_other_heads_channels_together() -> None:
    model, x = tiny_vit().eval(), torch.randn(1, 3, 32, 32)
    before = [m.in_proj_weight.detach().clone() for m in _attentions(model)]
    patch = model.conv_proj.weight.detach().flatten(1).clone()
    compress.prune.channels(model, x, ratio=0.5, round_to=1, prune_num_heads=True, prune_head_dims=False,
                            exclude=["*mlp.0"])
    kept = _kept(patch, model.conv_proj.weight.detach().flatten(1))
    hd = D // HEADS
    head = kept[0] // hd
    assert kept == list(range(head * hd, (head + 1) * hd))  # one whole head, in order
    for old, mha in zip(before, _attentions(model), strict=True):
        assert (mha.num_heads, mha.head_dim) == (1, hd)
        for k in range(3):  # q, k and v rows of that head, over the kept embedding channels
            rows = old[k * D + head * hd: k * D + (head + 1) * hd][:, kept]
            assert torch.equal(mha.in_proj_weight[k * hd:(k + 1) * hd], rows)
    assert [b.mlp[0].out_features for b in model.encoder.layers] == [MLP] * LAYERS


def test_head_dims_shrink_equally_inside_every_head_to_a_multiple_of_round_to() -> None:
    model, x = tiny_vit().eval(), torch.randn(1, 3, 32, 32)
    patch = model.conv_proj.weight.detach().flatten(1).clone()
    compress.prune.channels(model, x, ratio=0.3, round_to=4)
    hd = D // HEADS
    kept = _kept(patch, model.conv_proj.weight.detach().flatten(1))
    # 16 - floor(16 * 0.3) = 12 per head (a multiple of 4): no channel crosses into another head
    assert [sum(h * hd <= k < (h + 1) * hd for k in kept) for h in range(HEADS)] == [12, 12]
    assert all((m.num_heads, m.head_dim, m.embed_dim) == (HEADS, 12, 24) for m in _attentions(model))
    assert [b.mlp[0].out_features for b in model.encoder.layers] == [48, 48]  # 64 - 19 = 45 -> 48
    assert model(x).shape == (1, CLASSES)


def test_with_both_head_options_off_only_mlp_widths_go() -> None:
    model, x = tiny_vit().eval(), torch.randn(1, 3, 32, 32)
    pruner = compress.prune.ChannelPruner(model, x, compress.prune.ChannelOptions(
        round_to=1, heads=compress.prune.HeadOptions(prune_num_heads=False, prune_head_dims=False)))
    changed = pruner.prune(0.5)
    assert sorted(changed) == [f"encoder.layers.encoder_layer_{i}.mlp.0" for i in range(LAYERS)]
    assert pruner.skipped["encoder.layers.encoder_layer_1.mlp.3"] == (
        "attention heads: prune_num_heads and prune_head_dims are both off")
    assert model.hidden_dim == D and model(x).shape == (1, CLASSES)


def test_a_plan_that_grows_heads_is_refused_in_one_line() -> None:
    model = tiny_vit()
    bad = {"encoder.layers.encoder_layer_0.self_attention": {"attrs": {"num_heads": 4}, "shapes": {}}}
    with pytest.raises(CompressError) as err:
        plan.apply(model, bad)
    assert str(err.value) == ("modules.encoder.layers.encoder_layer_0.self_attention.attrs.num_heads: 4 does not fit "
                              "MultiheadAttention 'encoder.layers.encoder_layer_0.self_attention' whose num_heads is 2 "
                              "(pruning only shrinks)")


VIT_RECIPE = """\
name: vit-prune
model: {factory: compress.zoo:vit_tiny, kwargs: {hidden_dim: 32, num_heads: 2, mlp_dim: 64}}
data:
  eval: {source: digits, split: test, size: 32, channels: 3, limit: 64}
metric: agreement
stages:
  - prune: {method: channel, macs_reduction: 2.0, round_to: 1, latency_check: false, finetune: {epochs: 0}, %s}
"""


@pytest.mark.parametrize(("option", "expected"), [
    ("head_pruning_ratio: 0.5", "stages.0.prune: head_pruning_ratio needs prune_num_heads: true"),
    ("prune_num_heads: true, head_pruning_ratio: 1.0", "stages.0.prune.head_pruning_ratio: Input should be less than 1"),
    ("prune_head_dim: true", "stages.0.prune.prune_head_dim: unknown key"),
], ids=["ratio-without-heads", "all-heads", "typo"])
def test_bad_head_options_fail_validate_in_one_line(option, expected, write_recipe, cli) -> None:
    assert expected in cli("validate", write_recipe(VIT_RECIPE % option)).error_line()


def test_validate_dry_runs_head_pruning_of_a_vit(write_recipe, cli) -> None:
    result = cli("validate", write_recipe(VIT_RECIPE % "prune_num_heads: true"))
    assert result.code == 0, result.err
    assert "dry run: MACs / 2." in result.out


def test_a_macs_target_holds_the_embedding_a_step_short_and_lets_the_mlp_go_further() -> None:
    torch.manual_seed(0)
    model, x = vit_tiny().eval(), torch.randn(1, 3, 32, 32)  # width 64: 4 heads of 16, MLP 128
    base = count_macs(model, x)
    # the shared ratio would jump from 3 heads (1.8x) to 2 (3.3x); 3 heads and narrower MLPs land on 2x
    compress.prune.channels(model, x, macs_reduction=2.0, prune_num_heads=True)
    mha = _attentions(model)[0]
    assert (mha.num_heads, mha.head_dim) == (3, 16)
    assert [b.mlp[0].out_features for b in model.encoder.layers] == [48, 48]  # multiples of round_to 8
    assert 2.0 <= base / count_macs(model, x) < 2.0 * OVERSHOOT


@pytest.mark.slow  # a whole run directory (dry run, bisection, checkpoint): 1-18 s depending on machine load
def test_prune_stage_reports_the_head_layout_and_its_checkpoint_reloads(write_recipe, cli, tmp_path) -> None:
    recipe = write_recipe(VIT_RECIPE % "prune_num_heads: true, head_pruning_ratio: 0.5")
    out = tmp_path / "run"
    assert cli("run", recipe, "--out", out, "--quiet").code == 0
    entry = read_report(out)["stages"][0]
    attention = entry["prune"]["attention"]
    assert attention == {f"encoder.layers.encoder_layer_{i}.self_attention": {"num_heads": [2, 1], "head_dim": [16, 16]}
                         for i in range(LAYERS)}
    model = compress.load(out / entry["checkpoint"])
    assert [m.num_heads for m in _attentions(model)] == [1] * LAYERS
    assert count_macs(model, torch.zeros(1, 3, 32, 32)) == entry["macs"]


def test_an_overshoot_on_a_vit_names_the_head_steps_and_the_ways_to_finer_ones() -> None:
    torch.manual_seed(0)
    model, x = vit_tiny().eval(), torch.randn(1, 3, 32, 32)  # heads of 16, round_to 8: 16 or 8 dims a head
    with pytest.warns(UserWarning) as caught:
        compress.prune.channels(model, x, macs_reduction=2.0)
    assert [str(w.message) for w in caught] == [
        "prune.channels: macs_reduction: asked 2x, got 3.35x (attention heads move in steps "
        "of round_to: 8 channels per head); prune_num_heads: true or a smaller round_to gives finer steps"]
    assert all(m.head_dim == 8 for m in _attentions(model))
