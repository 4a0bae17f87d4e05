"""Small real models for demos and tests."""

from __future__ import annotations

import torch
from torch import nn

from compress.errors import CompressError


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN and an identity (or 1x1 projection) shortcut, as in ResNet."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class DigitsCNN(nn.Module):
    """A small ResNet for 8x8 (or larger) digit images: stem, two residual stages, Linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def digits_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> DigitsCNN:
    """Factory for :class:`DigitsCNN` (``compress.zoo:digits_cnn`` in recipes)."""
    return DigitsCNN(num_classes=num_classes, in_channels=in_channels, width=width)


def digits_mlp(num_classes: int = 10, in_features: int = 64, hidden: int = 64) -> nn.Sequential:
    """A BatchNorm-free MLP on flattened 8x8 digits; used where runs must match bit for bit (DDP tests)."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
    )


def vit_tiny(num_classes: int = 10, image_size: int = 32, patch_size: int = 8, hidden_dim: int = 64,
             num_heads: int = 4, num_layers: int = 2, mlp_dim: int = 128) -> nn.Module:
    """A small torchvision ``VisionTransformer`` (``nn.MultiheadAttention`` blocks), random weights."""
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=num_layers, num_heads=num_heads,
                             hidden_dim=hidden_dim, mlp_dim=mlp_dim, num_classes=num_classes)


def bert_tiny(num_labels: int = 4, vocab_size: int = 256, hidden_size: int = 64, num_layers: int = 2,
              num_heads: int = 4, intermediate_size: int = 128, max_positions: int = 64) -> nn.Module:
    """A small Hugging Face ``BertForSequenceClassification`` built from a config (random weights, no
    download; needs ``pip install 'compress[transformers]'``). Its forward takes ``input_ids`` and
    ``attention_mask`` and returns a ``SequenceClassifierOutput`` whose ``logits`` the task metric reads."""
    try:
        import transformers
    except ImportError:
        raise CompressError("compress.zoo:bert_tiny needs transformers: pip install 'compress[transformers]'") from None
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                                     num_attention_heads=num_heads, intermediate_size=intermediate_size,
                                     max_position_embeddings=max_positions, num_labels=num_labels)
    return transformers.BertForSequenceClassification(config)
