"""Head-wise channel pruning of attentions that split their own projections into heads: Hugging Face BERT/ViT
(separate query/key/value Linears) and timm ViT (one packed qkv Linear), on token and image inputs.

The strongest check of "no channel crosses into another head": with the embedding left alone, the pruned model
computes exactly what the original computes with the pruned q/k/v output channels zeroed (a zeroed q and k
channel adds nothing to Q.Kt, a zeroed v channel nothing to the output; the softmax scale is kept, so head dims
may shrink too). Mixing heads would change which channels each head's softmax sees, far beyond rounding.
"""

from __future__ import annotations

import copy

import onnxruntime as ort
import pytest
import torch
from torch import nn

import compress
from compress import prune, zoo
from compress.prune import plan

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")


def _tokens() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"input_ids": torch.randint(2, 200, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}


def _bert() -> nn.Module:
    torch.manual_seed(0)
    return zoo.bert_tiny().eval()


def _timm_vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_classes=10, **kwargs).eval()


def _kept(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Which rows of ``before`` survive in ``after`` (rows compared whole: random rows match only themselves)."""
    return [int(torch.nonzero((before == row).all(1)).flatten()[0]) for row in after]


def _zero_rows(linear: nn.Linear, keep: list[int]) -> None:
    gone = sorted(set(range(linear.out_features)) - set(keep))
    with torch.no_grad():
        linear.weight[gone] = 0
        if linear.bias is not None:
            linear.bias[gone] = 0


def _logits(model: nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    return getattr(out, "logits", out)


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    # the pruned sums skip only exact zeros: float32 re-association over <= 64 terms, far below a moved channel
    # (which changes the logits by ~their own size)
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=0)


@pytest.mark.parametrize("options", [{"ratio": 0.5},  # 4 heads of 16 -> 4 heads of 8
                                     {"ratio": 0.5, "prune_num_heads": True, "prune_head_dims": False}])
def test_bert_heads_go_head_by_head_and_compute_the_original_with_those_channels_zeroed(options) -> None:
    model, x = _bert(), _tokens()
    original = copy.deepcopy(model)
    selves = [layer.attention.self for layer in model.bert.encoder.layer]
    rows = [s.query.weight.detach().clone() for s in selves]
    prune.channels(model, x, include=["*.query", "*.key", "*.value"], round_to=1, **options)
    expected = (2, 16) if options.get("prune_num_heads") else (4, 8)
    for old_rows, s, o in zip(rows, selves, [layer.attention.self for layer in original.bert.encoder.layer],
                              strict=True):
        assert (s.num_attention_heads, s.attention_head_size, s.all_head_size) == (*expected, 32)
        assert s.query.weight.shape == s.key.weight.shape == s.value.weight.shape == (32, 64)
        kept = _kept(old_rows, s.query.weight.detach())
        per_head = [sum(h * 16 <= k < (h + 1) * 16 for k in kept) for h in range(4)]
        assert sorted(per_head) == ([0, 0, 16, 16] if options.get("prune_num_heads") else [8, 8, 8, 8])
        for linear in (o.query, o.key, o.value):
            _zero_rows(linear, kept)
    _same(_logits(model, x), _logits(original, x))


def test_the_least_important_head_goes_first() -> None:
    model, x = _bert(), _tokens()
    s = model.bert.encoder.layer[0].attention.self
    with torch.no_grad():  # head 2 of layer 0 made the smallest by far
        for linear in (s.query, s.key, s.value):
            linear.weight[32:48] *= 0.01
    rows = s.query.weight.detach().clone()
    prune.channels(model, x, include=["*.query", "*.key", "*.value"], ratio=0.25, round_to=1,
                   prune_num_heads=True, prune_head_dims=False)
    assert s.num_attention_heads == 3 and not set(_kept(rows, s.query.weight.detach())) & set(range(32, 48))


def test_bert_prunes_heads_and_embedding_together_reloads_from_its_plan_and_exports(tmp_path) -> None:
    model, x = _bert(), _tokens()
    before = sum(p.numel() for p in model.parameters())
    pruner = prune.ChannelPruner(model, x, prune.ChannelOptions(round_to=4))
    pruner.prune(0.5)
    recorded = pruner.finish()
    s = model.bert.encoder.layer[1].attention.self
    assert (s.num_attention_heads, s.attention_head_size, s.all_head_size) == (4, 8, 32)
    assert pruner.heads()["bert.encoder.layer.1.attention.self"] == {"num_heads": [4, 4], "head_dim": [16, 8]}
    assert model.bert.embeddings.word_embeddings.weight.shape[1] == 32  # the embedding went too
    assert sum(p.numel() for p in model.parameters()) < 0.5 * before
    # the plan records the head bookkeeping as plain integers: a fresh BERT replays it without pickle
    assert recorded["bert.encoder.layer.0.attention.self"]["attrs"] == {"attention_head_size": 8, "all_head_size": 32}
    fresh = _bert()
    plan.apply(fresh, recorded)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(_logits(fresh, x), _logits(model, x))
    # opset 13, token inputs: ONNX Runtime agrees
    path = tmp_path / "bert.onnx"
    compress.export.onnx(model, x, path, opset=13)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in x.items()})[0]
    _same(torch.as_tensor(got), _logits(model, x))


def test_timm_packed_qkv_loses_the_same_heads_in_q_k_and_v() -> None:
    model, x = _timm_vit(), torch.randn(2, 3, 32, 32)
    original = copy.deepcopy(model)
    rows = [b.attn.qkv.weight.detach().clone() for b in model.blocks]
    prune.channels(model, x, include=["*.qkv"], ratio=0.34, round_to=1, prune_num_heads=True,
                   prune_head_dims=False)
    for old_rows, block, twin in zip(rows, model.blocks, original.blocks, strict=True):
        a = block.attn
        assert (a.num_heads, a.head_dim, a.attn_dim) == (2, 64, 128)
        assert a.qkv.weight.shape == (384, 192) and a.proj.weight.shape == (192, 128)
        kept = _kept(old_rows, a.qkv.weight.detach())
        inner = [k for k in kept if k < 192]
        assert kept == inner + [k + 192 for k in inner] + [k + 384 for k in inner]  # q, k, v: the same channels
        assert sorted({k // 64 for k in inner}) == sorted({k // 64 for k in inner})[:2] and len(inner) == 128
        _zero_rows(twin.attn.qkv, kept)
    _same(_logits(model, x), _logits(original, x))


def test_timm_head_dims_shrink_in_every_head_and_export_at_opset_13(tmp_path) -> None:
    model, x = _timm_vit(), torch.randn(2, 3, 32, 32)
    prune.channels(model, x, ratio=0.5, round_to=8)
    for block in model.blocks:
        a = block.attn
        assert (a.num_heads, a.head_dim, a.attn_dim) == (3, 32, 96) and a.qkv.out_features == 288
    path = tmp_path / "vit.onnx"
    compress.export.onnx(model, x, path, opset=13)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    _same(torch.as_tensor(got), _logits(model, x))


def test_per_head_qk_norm_keeps_the_heads_and_says_why() -> None:
    """timm's qk_norm is a LayerNorm over head_dim, applied to every head: Torch-Pruning puts it in the qkv group
    as if it were inner-width channels, so that group is left whole (the embedding and MLP still prune)."""
    model, x = _timm_vit(qk_norm=True), torch.randn(2, 3, 32, 32)
    pruner = prune.ChannelPruner(model, x, prune.ChannelOptions(
        round_to=1, heads=prune.HeadOptions(prune_num_heads=True, prune_head_dims=False)))
    pruner.prune(0.5)
    assert pruner.skipped["blocks.0.attn.qkv"] == (
        "'blocks.0.attn.q_norm' normalises q or k over head_dim, which the dependency tracer cannot follow: "
        "the heads stay")
    assert [(b.attn.num_heads, b.attn.head_dim, b.mlp.fc1.out_features) for b in model.blocks] == [(3, 64, 384)] * 2
    assert _logits(model, x).shape == (2, 10)


def test_hugging_face_vit_prunes_whole_heads_on_images() -> None:
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=128, num_labels=10)
    model, x = transformers.ViTForImageClassification(config).eval(), torch.randn(2, 3, 32, 32)
    pruner = prune.ChannelPruner(model, x, prune.ChannelOptions(
        round_to=1, heads=prune.HeadOptions(prune_num_heads=True, prune_head_dims=False)))
    pruner.prune(0.5)
    layouts = pruner.heads()
    assert len(layouts) == 2 and all(v == {"num_heads": [4, 2], "head_dim": [16, 16]} for v in layouts.values())
    assert _logits(model, x).shape == (2, 10)
