"""Tiny models that call ``F.scaled_dot_product_attention`` themselves (timm ViT, Hugging Face ViT and BERT built from
configs: nothing downloads), referenced as ``helpers_sdpa:FN``. All: width 32, 2 layers, 2 heads."""

import timm
import torch
import transformers
from helpers_models import Logits
from torch import nn


def timm_vit() -> nn.Module:
    """timm traces with torch.fx: its SDPA calls are graph nodes. Class token and head at std 0.5 so the logits
    differ between images (timm's init gives them std 0.02 / 1e-6-ish)."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                            depth=2, num_heads=2, num_classes=10)
    nn.init.normal_(vit.cls_token, std=0.5)
    nn.init.normal_(vit.head.weight, std=0.5)
    return vit


def hf_vit() -> nn.Module:
    """Hugging Face models do not trace with torch.fx: their SDPA sites are found by running them."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=10,
                                    initializer_range=0.2, attn_implementation="sdpa")
    return Logits(transformers.ViTForImageClassification(config))


def hf_bert() -> nn.Module:
    """Fed int64 token ids only (no attention mask)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3,
                                     initializer_range=0.2, attn_implementation="sdpa")
    return Logits(transformers.BertForSequenceClassification(config))


def token_task(n: int = 96, length: int = 12) -> torch.utils.data.TensorDataset:
    """int64 token ids labelled by which third of the vocabulary their first token falls in (3 classes)."""
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, 99, (n, length), generator=g)
    return torch.utils.data.TensorDataset(ids, ids[:, 0] // 33)
