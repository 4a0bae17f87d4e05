"""The teacher cache with batches padded per batch (dynamic padding): a sentence classifier's per-sample outputs
are reused whatever a sample's batch is padded to; per-token teacher outputs are refused in one line."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers_models import TokenTagger
from torch import nn

from compress.distill import Distiller
from compress.errors import CompressError
from compress.text_data import PAD, TaggedTokens, TopicTokens, collate_trimmed


class Pooled(nn.Module):
    """Mean of the unmasked token embeddings -> topic logits ``[N, 4]``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc = nn.Embedding(256, 16), nn.Linear(16, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask.unsqueeze(-1).float()
        return self.fc((self.embed(input_ids) * m).sum(1) / m.sum(1))


Batch = tuple[dict[str, torch.Tensor], torch.Tensor]  # inputs by name, labels


def _epochs(data: TopicTokens, pad_id: int = PAD) -> list[tuple[torch.Tensor, Batch]]:
    """Two epochs of batches of 8, grouped differently each epoch, so most samples are padded to another length."""
    order = [torch.arange(len(data)), torch.randperm(len(data), generator=torch.Generator().manual_seed(0))]
    batches = []
    for perm in order:
        for idx in perm.split(8):
            batch = collate_trimmed([data[int(i)] for i in idx])
            mask = batch["attention_mask"]
            batches.append((idx, ({"input_ids": batch["input_ids"].masked_fill(mask == 0, pad_id),
                                   "attention_mask": mask}, batch["labels"])))
    return batches


@pytest.mark.parametrize("pad_id", [PAD, 3])  # 0 (BERT) and another id (RoBERTa pads with 1): the mask decides
def test_cache_reuses_per_sample_outputs_across_paddings(pad_id: int) -> None:
    torch.manual_seed(0)
    teacher, data = Pooled().eval(), TopicTokens("train", samples=64)
    batches = _epochs(data, pad_id)
    assert len({x["input_ids"].shape[1] for _, (x, _) in batches}) > 3  # the paddings really differ
    losses = {}
    for cache in (False, True):
        student = copy.deepcopy(teacher)
        with torch.no_grad():
            student.fc.weight.mul_(0.5)  # a student unlike its teacher: the KD loss is not zero
        with Distiller(student, teacher, alpha=1.0, cache=cache) as kd:
            losses[cache] = [float(kd.loss(x, student(**x), y, indices=i).detach()) for i, (x, y) in batches]
            if cache:
                assert kd.cache.computed == 64 and kd.cache.reused == 64  # epoch 2 is read back, every sample
    # the cached epoch gives the live teacher's losses: a sample's pooled mean summed over another padding length
    # differs by a few float32 ulps (eps 1.2e-7), which the KD loss (a difference of log-softmaxes, ~5e-3 here)
    # turns into ~5e-5 relative; a wrong sample's teacher output moves a loss by more than 1e-2 relative
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-3, atol=1e-6)


def test_cache_refuses_per_token_teacher_outputs_of_varying_length() -> None:
    torch.manual_seed(0)
    teacher, data = TokenTagger().eval(), TaggedTokens("train", samples=32)
    student = copy.deepcopy(teacher)
    with Distiller(student, teacher, alpha=1.0, label_free=True, cache=True) as kd, \
            pytest.raises(CompressError, match=r"^distill\.cache: teacher outputs of \[\d+, 5\] per sample on one batch "
                                               r"and \[\d+, 5\] on another \(per-token outputs of batches padded"):
        for i, (x, _) in _epochs(data):
            kd.distill_loss(x, student(**x), indices=i)
