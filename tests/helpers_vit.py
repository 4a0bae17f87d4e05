"""A tiny torchvision ViT and its MACs written out by hand (shared by the profile and sparsity tests)."""

import torch
import torchvision
from torch import nn

# image 32, patch 8: 16 patches + the class token; width 32, MLP 64, 2 heads of 16, 2 layers, 10 classes
T, D, MLP, HEADS, LAYERS, CLASSES = 17, 32, 64, 2, 2, 10
PATCH = D * 16 * (3 * 8 * 8)  # conv_proj: 32 filters of 3x8x8 at 4x4 positions
QKV, SCORES, AV, OUT = T * D * 3 * D, HEADS * T * T * (D // HEADS), HEADS * T * T * (D // HEADS), T * D * D
MLP_MACS = T * D * MLP + T * MLP * D
VIT_MACS = PATCH + LAYERS * (QKV + SCORES + AV + OUT + MLP_MACS) + D * CLASSES


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=LAYERS, num_heads=HEADS,
                                                hidden_dim=D, mlp_dim=MLP, num_classes=CLASSES)
