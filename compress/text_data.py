"""A small generated text-classification task (no download): token ids, attention mask, topic label;
and its per-token variant (:class:`TaggedTokens`: each token's topic, for token classification).

Each sentence starts with a ``[CLS]`` id, holds 6-30 random filler tokens and a few *topic words*; the
label is the topic with the most words in it (ties are re-drawn). Counting words anywhere in the sequence
needs attention over every position, so a model must use its attention to learn it; the padding (id 0,
mask 0) differs per sample, so a model that ignored the mask would see a different task.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, default_collate

PAD, CLS = 0, 1
IGNORE = -100  # the label of positions no metric counts (Hugging Face's ignore index)
_FIRST_WORD = 2
_SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}


class TopicTokens(Dataset):
    """``{"input_ids", "attention_mask", "labels"}`` samples (int64), one fixed set per split."""

    def __init__(self, split: str = "train", samples: int = 2048, seq_len: int = 32, vocab_size: int = 256,
                 classes: int = 4, words_per_topic: int = 8, seed: int = 0) -> None:
        if split not in _SPLIT_SEEDS:
            raise ValueError(f"split '{split}' is not one of {', '.join(_SPLIT_SEEDS)}")
        if vocab_size < _FIRST_WORD + classes * words_per_topic + 8:
            raise ValueError(f"vocab_size {vocab_size} leaves no filler tokens beside {classes} topics")
        if seq_len < 8:
            raise ValueError(f"seq_len {seq_len} < 8")
        gen = torch.Generator().manual_seed(1000 * seed + _SPLIT_SEEDS[split])
        topics = torch.arange(_FIRST_WORD, _FIRST_WORD + classes * words_per_topic).view(classes, words_per_topic)
        filler_low = _FIRST_WORD + classes * words_per_topic
        ids = torch.full((samples, seq_len), PAD, dtype=torch.long)
        mask = torch.zeros(samples, seq_len, dtype=torch.long)
        labels = torch.empty(samples, dtype=torch.long)
        for i in range(samples):
            while True:
                length = int(torch.randint(8, seq_len + 1, (1,), generator=gen))
                counts = torch.randint(0, 4, (classes,), generator=gen)
                if int((counts == counts.max()).sum()) == 1 and 1 + int(counts.sum()) <= length:
                    break
            words = [topics[c, torch.randint(0, words_per_topic, (int(n),), generator=gen)]
                     for c, n in enumerate(counts)]
            body = torch.randint(filler_low, vocab_size, (length - 1,), generator=gen)
            places = torch.randperm(length - 1, generator=gen)[: int(counts.sum())]
            body[places] = torch.cat(words)
            ids[i, 0], ids[i, 1:length] = CLS, body
            mask[i, :length] = 1
            labels[i] = int(counts.argmax())
        self.classes, self.words_per_topic = classes, words_per_topic
        self.input_ids, self.attention_mask, self.labels = ids, mask, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index],
                "labels": self.labels[index]}


def topic_tokens(split: str = "train", **kwargs: int) -> TopicTokens:
    """Factory for recipes: ``{source: python, factory: "compress.text_data:topic_tokens", kwargs: {split: test}}``."""
    return TopicTokens(split, **kwargs)


class TaggedTokens(TopicTokens):
    """The same sentences tagged per token: ``labels`` ``[T]`` hold each topic word's topic + 1 (1..classes), 0
    for filler, and -100 (not counted) for ``[CLS]`` and padding. A token classifier has ``classes + 1`` outputs."""

    def __init__(self, split: str = "train", **kwargs: int) -> None:
        super().__init__(split, **kwargs)
        ids = self.input_ids
        topic = (ids - _FIRST_WORD) // self.words_per_topic + 1
        is_word = (ids >= _FIRST_WORD) & (ids < _FIRST_WORD + self.classes * self.words_per_topic)
        tags = torch.where(is_word, topic, torch.zeros_like(ids))
        self.labels = torch.where((self.attention_mask == 0) | (ids == CLS), torch.full_like(ids, IGNORE), tags)


def tagged_tokens(split: str = "train", **kwargs: int) -> TaggedTokens:
    """Factory for recipes: ``{source: python, factory: "compress.text_data:tagged_tokens", kwargs: {split: test}}``."""
    return TaggedTokens(split, **kwargs)


def collate_trimmed(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``default_collate``, then every per-token tensor cut to the batch's longest sentence: dynamic padding,
    so batches have different sequence lengths (as a tokenizer padding per batch gives)."""
    batch = default_collate(samples)
    longest = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :longest] if v.dim() == 2 else v for k, v in batch.items()}
