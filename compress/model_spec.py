"""Where a model comes from: a factory (``module:callable``) and/or a compress checkpoint."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from compress.config import PathStr, Strict
from compress.imports import check_reference
from compress.trust import check_module_name


class ModelSpec(Strict):
    """Where the model comes from. A compress checkpoint carries its own factory."""

    factory: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: PathStr | None = None
    input_shape: list[Annotated[int, Field(gt=0)]] | None = None
    trust: list[str] = Field(default_factory=list)  # modules whose factories checkpoints may name (compress.trust)

    @field_validator("factory")
    @classmethod
    def _factory_ref(cls, v: str | None) -> str | None:
        return None if v is None else check_reference(v)

    @field_validator("trust")
    @classmethod
    def _trust(cls, v: list[str]) -> list[str]:
        return [check_module_name(name) for name in v]

    @model_validator(mode="after")
    def _needs_something(self) -> ModelSpec:
        if self.factory is None and self.checkpoint is None:
            raise ValueError("give a 'factory' (module:callable) or a compress 'checkpoint'")
        return self
