"""The 2:4 pre-flight on models that hide matmuls: shares of the true MAC total, attention layers, and why nothing moved."""

from __future__ import annotations

import torch
import torchvision
from helpers_vit import MLP_MACS, OUT, QKV, SCORES, VIT_MACS, tiny_vit
from torch import nn

import compress
from compress import sparsity
from compress.sparsity.masks import Sparsifier, plan

ATTN = "encoder.layers.encoder_layer_{}.self_attention"


def test_vit_preflight_shares_are_of_the_true_total_and_attention_projections_are_layers() -> None:
    vit, x = tiny_vit().eval(), torch.randn(1, 3, 32, 32)
    result = Sparsifier(vit)
    plan(vit, x, (), (), "sparsity", result)
    for i in range(2):
        # its forward never runs (MultiheadAttention reads its weight through F.linear): still a layer, with MACs
        assert result.layers[f"{ATTN.format(i)}.out_proj"]["macs"] == OUT
        assert f"{ATTN.format(i)}.out_proj" not in result.skipped
        # the packed q/k/v weight F.linear reads: a [3E, E] weight judged like a Linear's
        assert result.layers[f"{ATTN.format(i)}.in_proj_weight"]["macs"] == QKV
    # q/k/v, out_proj and the MLP of both layers (conv_proj: 3 inputs; head: 10 outputs)
    eligible = 2 * (QKV + OUT + MLP_MACS)
    assert result.estimate["eligible_layers"] == 8
    assert result.estimate["eligible_macs_share"] == round(eligible / VIT_MACS, 4) == 0.6725  # was 0.73 of Conv/Linear
    assert result.estimate["weightless_macs_share"] == round(2 * 2 * SCORES / VIT_MACS, 4)


def test_vit_out_proj_masks_reach_the_attention_forward() -> None:
    vit, x = tiny_vit().eval(), torch.randn(1, 3, 32, 32)
    tokens = torch.randn(1, 17, 32)  # the encoder's output: torchvision zero-initialises the head
    names = [f"{ATTN.format(i)}.out_proj" for i in range(2)]
    before = vit.encoder(tokens).detach()
    sparse = sparsity.apply_2to4(vit, example_input=x, include=["*out_proj"])
    assert list(sparse.layers) == names and sparsity.verify_model(vit).sparse_layers == names
    after = vit.encoder(tokens).detach()
    with torch.no_grad():  # undo the masks: the forward that read the masked weights comes back
        for name in names:
            vit.get_submodule(name).weight.copy_(tiny_vit().get_submodule(name).weight)
    assert not torch.allclose(after, before) and torch.equal(vit.encoder(tokens), before)


def small_densenet(growth: int, bn_size: int, init: int) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.DenseNet(growth_rate=growth, block_config=(2, 2), num_init_features=init,
                                       bn_size=bn_size, num_classes=10).eval()


def test_densenet_permute_that_reorders_nothing_says_why() -> None:
    # 24 stem channels, growth 8: the one 2:4-eligible layer reads a concatenation (24 stem + 8 new channels)
    model = small_densenet(growth=8, bn_size=3, init=24)
    result = sparsity.apply_2to4(model, example_input=torch.randn(1, 3, 32, 32), permute=True)
    layer = "features.denseblock1.denselayer2.conv1"
    assert list(result.layers) == [layer] and result.permutations == []
    assert set(result.unpermuted) == {layer} and "concatenation" in result.unpermuted[layer]
    report = result.report()
    assert "no channel group feeds a 2:4 layer one to one" in report["permute_reason"]
    assert "24 of its 32 input channels come from 'features.conv0'" in report["permute_reason"]


def test_densenet_permute_names_the_concatenation_readers_it_could_not_reorder() -> None:
    model = small_densenet(growth=16, bn_size=2, init=32)
    x = torch.randn(2, 3, 32, 32)
    before = model(x).detach()
    result = sparsity.apply_2to4(model, example_input=x[:1], permute=True)
    assert result.permute_reason is None and all(p["swaps"] > 0 for p in result.permutations)
    assert set(result.unpermuted) == {"features.denseblock1.denselayer2.conv1", "features.transition1.conv",
                                      "features.denseblock2.denselayer2.conv1"}
    assert all("concatenation" in why for why in result.unpermuted.values())
    assert "permute_reason" not in result.report()
    assert not torch.allclose(model(x), before)  # the masks changed weights (the permutation alone would not)


def test_vit_2to4_layers_verify_in_the_exported_onnx(tmp_path) -> None:
    vit, x = tiny_vit().eval(), torch.randn(1, 3, 32, 32)
    sparse = sparsity.apply_2to4(vit, example_input=x)
    compress.export.onnx(vit, x, tmp_path / "vit.onnx", target="onnxruntime", opset=17)  # SDPA needs opset 14+
    check = sparsity.verify_onnx(tmp_path / "vit.onnx")
    assert f"{ATTN.format(0)}.out_proj" in check.sparse_layers and check.missing(list(sparse.layers)) == []
    # the float export folds the packed q/k/v weight into one constant, named by the attention's scope
    assert f"{ATTN.format(0)}.in_proj_weight" in sparse.layers and ATTN.format(0) in check.sparse_layers
