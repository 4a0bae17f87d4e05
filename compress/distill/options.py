"""The ``distill`` options of a recipe: the ``distill`` stage and every stage's ``finetune.distill`` block."""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from compress.config import Strict
from compress.model_spec import ModelSpec

_STAGE = re.compile(r"^stage\s+(\d+)$")


class HintLoss(str, Enum):
    mse = "mse"
    cosine = "cosine"


def teacher_stage(teacher: str | ModelSpec) -> int | None:
    """N of ``teacher: stage N`` (1-based, as the run directory numbers stages); None otherwise."""
    match = _STAGE.match(teacher) if isinstance(teacher, str) else None
    return int(match.group(1)) if match else None


class DistillOptions(Strict):
    """Teacher, logits KD, hints and teacher-output caching.

    The loss is ``(1 - alpha) * task + alpha * T^2 * KL(softmax(t/T) || softmax(s/T))
    + hint_weight * mean(hint losses)``; ``label_free`` drops the task term (no labels needed).
    """

    teacher: str | ModelSpec = "baseline"  # baseline | "stage N" | {factory, kwargs, checkpoint}
    temperature: Annotated[float, Field(gt=0, le=100)] = 4.0  # softmax(t/T) at T > 100 is flat: no signal
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.7
    hints: dict[str, str] = Field(default_factory=dict)  # student layer -> teacher layer
    hint_loss: HintLoss = HintLoss.mse
    hint_weight: Annotated[float, Field(ge=0)] = 1.0
    label_free: bool = False
    cache: bool = False  # keep teacher outputs per training sample (memory: see README)
    cache_max_mb: Annotated[float, Field(gt=0)] = 1024.0

    @field_validator("teacher")
    @classmethod
    def _teacher(cls, v: str | ModelSpec) -> str | ModelSpec:
        if isinstance(v, str):
            v = " ".join(v.split())
            if v != "baseline" and teacher_stage(v) is None:
                raise ValueError(f"'{v}' is not 'baseline', 'stage N' or a model spec {{factory, kwargs, checkpoint}}")
            if teacher_stage(v) == 0:
                raise ValueError("stages are numbered from 1 ('stage 1' is the first stage)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _label_free_alpha(cls, data: Any) -> Any:
        """Label-free KD has no task loss to mix: alpha is 1 (so the resolved recipe says so and reloads)."""
        if isinstance(data, dict) and data.get("label_free") is True and "alpha" not in data:
            return {**data, "alpha": 1.0}
        return data

    @model_validator(mode="after")
    def _label_free(self) -> DistillOptions:
        if self.label_free and "alpha" in self.model_fields_set and self.alpha != 1.0:
            raise ValueError("label_free uses no labels, so there is no task loss to mix: leave alpha out (or 1)")
        return self

    @property
    def task_weight(self) -> float:
        return 0.0 if self.label_free else 1.0 - self.alpha

    @property
    def kd_weight(self) -> float:
        return 1.0 if self.label_free else self.alpha

    def describe_teacher(self) -> str:
        if isinstance(self.teacher, str):
            return self.teacher
        return self.teacher.factory or self.teacher.checkpoint or "model spec"
