"""Logits KD on a model with several outputs: the output the metric names, or a one-line refusal."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers_models import logits_features

from compress.distill import Distiller
from compress.errors import CompressError


def test_kd_takes_the_named_output_of_student_and_teacher() -> None:
    torch.manual_seed(0)
    student = logits_features()
    teacher = copy.deepcopy(student)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    kd = Distiller(student, teacher, temperature=4.0, alpha=1.0, example_input=x, output="output0")
    try:
        loss = kd.loss(x, student(x), y)  # the tuple goes in as the forward returned it
        assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)  # the teacher is a copy: KL 0 on the logits
    finally:
        kd.close()
    with pytest.raises(CompressError, match=r"^distill: the model returns 2 outputs \('output0', 'output1'\)"):
        Distiller(student, teacher, example_input=x)
