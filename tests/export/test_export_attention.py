"""Transformers export at opset 13 with attention as MatMul/Softmax, scaled on the Q side, equal to PyTorch.

Models: torchvision ViT and Swin, timm ViT (``pretrained=False``), Hugging Face ViT and BERT built from a
config, ``nn.TransformerEncoder`` exported under ``no_grad`` (where its native fast path would run); all at
hidden 32, 2 layers, 2 heads. Nothing downloads.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from helpers_models import Logits
from helpers_vit import tiny_vit
from torch import nn

from compress.export.onnx import export_onnx

# float32 keeps ~7 digits; the exported graph sums in other orders than torch's kernels (scale on Q, the
# fused attention kernel, LayerNorm): measured differences are <= 3e-6 of the output's RMS through two layers.
# 1e-4 of the RMS leaves 30x room, while a wrong scale, mask or head split moves outputs by O(RMS).
REL = 1e-4


def _torchvision_vit() -> tuple[nn.Module, torch.Tensor, int]:
    vit = tiny_vit()
    nn.init.normal_(vit.heads.head.weight)  # torchvision zero-inits the head: outputs would all be 0
    return vit, torch.randn(3, 3, 32, 32), 2


def _swin() -> tuple[nn.Module, torch.Tensor, int]:
    torch.manual_seed(0)
    swin = torchvision.models.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=32, depths=[2], num_heads=[2], window_size=[4, 4], num_classes=10)
    return swin, torch.randn(3, 3, 32, 32), 2


def _timm_vit() -> tuple[nn.Module, torch.Tensor, int]:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                            depth=2, num_heads=2, num_classes=10)
    return vit, torch.randn(3, 3, 32, 32), 2


def _hf_vit() -> tuple[nn.Module, torch.Tensor, int]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=10,
                                    attn_implementation="sdpa")
    return Logits(transformers.ViTForImageClassification(config)), torch.randn(3, 3, 32, 32), 2


def _hf_bert() -> tuple[nn.Module, torch.Tensor, int]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3,
                                     attn_implementation="sdpa")
    ids = torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(0))
    return Logits(transformers.BertForSequenceClassification(config)), ids, 2


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def _torch_encoder() -> tuple[nn.Module, torch.Tensor, int]:
    torch.manual_seed(0)
    return _Encoder(), torch.randn(3, 9, 32), 2


MODELS: dict[str, Callable[[], tuple[nn.Module, torch.Tensor, int]]] = {
    "torchvision_vit": _torchvision_vit, "torchvision_swin": _swin, "timm_vit": _timm_vit,
    "hf_vit": _hf_vit, "hf_bert": _hf_bert, "torch_encoder": _torch_encoder,
}


def _producers(proto: onnx.ModelProto) -> dict[str, str]:
    return {out: node.op_type for node in proto.graph.node for out in node.output}


@pytest.mark.parametrize("name", MODELS)
def test_attention_exports_at_opset_13_as_matmul_softmax(name: str, tmp_path) -> None:
    model, x, attentions = MODELS[name]()
    model.eval()
    with torch.no_grad():  # no_grad is where nn.MultiheadAttention would take its native fast path
        info = export_onnx(model, x, tmp_path / "m.onnx", opset=13)
        ref = model(x)
    assert info.opset == 13
    proto = onnx.load(str(tmp_path / "m.onnx"))
    made_by = _producers(proto)
    matmuls = [[made_by.get(i, "weight") for i in n.input] for n in proto.graph.node if n.op_type == "MatMul"]
    # per attention: Q·Kᵀ reads the Q-side scale's Mul and Kᵀ; probs·V reads the Softmax directly
    assert sum(m == ["Mul", "Transpose"] for m in matmuls) == attentions, matmuls
    assert sum(m[0] == "Softmax" for m in matmuls) == attentions, matmuls
    assert sum(n.op_type == "Softmax" for n in proto.graph.node) == attentions
    out = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"input": x.numpy()})[0]
    rms = float(ref.pow(2).mean().sqrt())
    assert rms > 0
    assert np.abs(out - ref.numpy()).max() <= REL * rms


class _Masked(nn.Module):
    """Causal and boolean-masked attention through F.scaled_dot_product_attention (a decoder's two forms)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        keep = torch.arange(x.shape[1])[None, :] <= torch.arange(x.shape[1])[:, None]
        causal = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        masked = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return (causal + masked).sum(1)


def test_causal_and_bool_masks_export_at_opset_13_for_another_batch(tmp_path) -> None:
    torch.manual_seed(0)
    model = _Masked().eval()
    export_onnx(model, torch.randn(2, 5, 16), tmp_path / "m.onnx", opset=13)
    x = torch.randn(3, 5, 16)
    out = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x)
    assert np.abs(out - ref.numpy()).max() <= REL * float(ref.pow(2).mean().sqrt())
