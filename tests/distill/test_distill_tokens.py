"""Logits KD and the task loss on a token classifier's ``[N, T, classes]`` logits: softmax over the classes (the
last axis), not over the positions."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers_models import TokenTagger

from compress.distill import Distiller
from compress.distill.losses import kd_loss
from compress.text_data import TaggedTokens


def test_token_kd_is_per_token_over_classes() -> None:
    torch.manual_seed(0)
    teacher, data = TokenTagger().eval(), TaggedTokens("train", samples=16)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.head.weight.mul_(0.5)
    x = {"input_ids": data.input_ids, "attention_mask": data.attention_mask}
    s, t = student(**x).detach(), teacher(**x).detach()
    temp = 2.0
    # by hand: KL(teacher || student) per token over its 5 classes, summed, / samples, x T^2
    kl = (F.softmax(t / temp, -1) * (F.log_softmax(t / temp, -1) - F.log_softmax(s / temp, -1))).sum()
    by_hand = float(kl / (16 * 32) * temp**2)  # batchmean over the 16 x 32 tokens
    assert float(kd_loss(s, t, temp, dim=2)) == pytest.approx(by_hand, rel=1e-5)  # float32 sums, 512 terms
    with Distiller(student, teacher, temperature=temp, alpha=1.0) as kd:
        assert float(kd.distill_loss(x, s)) == pytest.approx(by_hand, rel=1e-5)  # [N, T] ids: classes last
    with Distiller(student, teacher, temperature=temp, alpha=0.5) as kd:
        ce = F.cross_entropy(s.transpose(1, 2), data.labels)  # ignores the -100 of [CLS] and padding
        assert float(kd.loss(x, s, data.labels)) == pytest.approx(0.5 * by_hand + 0.5 * float(ce), rel=1e-5)
