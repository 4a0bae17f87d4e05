"""Stage types and the context they run in."""

from compress.stages.registry import StageType, register, stage_types

__all__ = ["StageType", "register", "stage_types"]
