"""Models and data the quantization benchmarks share (trained once, cached under runs/bench/)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

import compress
import compress.metrics
from compress.data import build_loader
from compress.recipe import DigitsData

CACHE = Path("runs/bench")


def digits(split: str, size: int = 8, channels: int = 1, batch_size: int = 64, limit: int | None = None) -> DataLoader:
    spec = DigitsData(source="digits", split=split, size=size, channels=channels, batch_size=batch_size, limit=limit)
    return build_loader(spec, f"digits:{split}", train=False)


def _train(factory: str, kwargs: dict, size: int, channels: int, epochs: int, lr: float, path: Path,
           shuffle: bool = False, **options: object) -> nn.Module:
    """``factory(**kwargs)`` trained on digits (cached at ``path``); ``options``: more FinetuneConfig fields
    (with ``keep_best=False`` the last epoch is kept and the test split is never looked at)."""
    if path.exists():
        return compress.load(path).eval()
    torch.manual_seed(0)
    model = compress.build(factory, kwargs)
    spec = DigitsData(source="digits", split="train", size=size, channels=channels, batch_size=64)
    train = build_loader(spec, "digits:train", train=shuffle)
    score = lambda m: compress.metrics.score("top1", compress.metrics.collect(m, digits("test", size, channels)))["top1"]  # noqa: E731
    config = compress.FinetuneConfig(epochs=epochs, lr=lr, seed=0, **options)
    compress.finetune(model, train, config, evaluate=score if config.keep_best else None, progress=False, reshard=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    compress.save(model, path)
    return model.eval()


def digits_cnn() -> tuple[nn.Module, int, int]:
    """digits_cnn trained 15 epochs on 8x8 digits; returns ``(model, size, channels)``."""
    return _train("compress.zoo:digits_cnn", {"num_classes": 10}, 8, 1, 15, 0.05, CACHE / "digits_cnn.pt"), 8, 1


def resnet18() -> tuple[nn.Module, int, int]:
    """torchvision resnet18 (num_classes 10) trained briefly on digits upscaled to 32x32 RGB."""
    model = _train("torchvision.models:resnet18", {"num_classes": 10}, 32, 3, 4, 0.05, CACHE / "resnet18_digits32.pt")
    return model, 32, 3


def resnet18_teacher() -> tuple[nn.Module, int, int]:
    """resnet18 as above, but trained 10 epochs on the shuffled train split: a teacher worth distilling
    from (the brief ``resnet18()`` base is kept for the quantization and pruning figures)."""
    model = _train("torchvision.models:resnet18", {"num_classes": 10}, 32, 3, 10, 0.05,
                   CACHE / "resnet18_digits32_teacher.pt", shuffle=True)
    return model, 32, 3


def vit_tiny(epochs: int = 30) -> tuple[nn.Module, int, int]:
    """``compress.zoo:vit_tiny`` (torchvision ViT, 2 layers of 4 heads, width 64) trained ``epochs`` with AdamW
    (lr 1e-3, cosine) on the shuffled digits train split at 32x32 RGB, last epoch kept."""
    model = _train("compress.zoo:vit_tiny", {"num_classes": 10}, 32, 3, epochs, 1e-3,
                   CACHE / f"vit_tiny_digits32_e{epochs}.pt", shuffle=True, optimizer="adamw", keep_best=False)
    return model, 32, 3


def topic_tokens(split: str, samples: int, batch_size: int = 64, shuffle: bool = False, seq_len: int = 32
                 ) -> DataLoader:
    """``compress.text_data.TopicTokens`` batches (dicts of input_ids, attention_mask, labels)."""
    from compress.data import make_loader
    from compress.text_data import TopicTokens

    return make_loader(TopicTokens(split, samples=samples, seq_len=seq_len), f"topic:{split}", batch_size=batch_size,
                       shuffle=shuffle)


def bert_tiny(epochs: int = 10, samples: int = 2048) -> nn.Module:
    """``compress.zoo:bert_tiny`` (Hugging Face BERT from a config, 2 layers x 4 heads, width 64) trained ``epochs``
    with AdamW (lr 5e-3, cosine, last epoch kept) on ``samples`` shuffled TopicTokens train samples."""
    path = CACHE / f"bert_tiny_topics_e{epochs}_n{samples}.pt"
    if path.exists():
        return compress.load(path).eval()
    torch.manual_seed(0)
    model = compress.build("compress.zoo:bert_tiny", {})
    config = compress.FinetuneConfig(epochs=epochs, lr=5e-3, optimizer="adamw", seed=0, keep_best=False)
    compress.finetune(model, topic_tokens("train", samples, shuffle=True), config, progress=False, output="logits", reshard=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    compress.save(model, path)
    return model.eval()
