"""What kind of model a file holds, from its suffix: ONNX, a TensorRT engine, or a compress checkpoint.

The one place that maps suffixes to kinds (``compress check`` and ``compress bench`` both ask here).
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path

from compress.errors import CompressError

ONNX_SUFFIX = ".onnx"
ENGINE_SUFFIXES = (".plan", ".engine")
CHECKPOINT_SUFFIXES = (".pt", ".pth")


class ModelKind(str, Enum):
    """The kinds of model file the toolkit runs."""

    onnx = "onnx"
    engine = "engine"  # a serialized TensorRT engine
    checkpoint = "checkpoint"  # a compress checkpoint, run in PyTorch eager


def model_kind(path: str | os.PathLike[str]) -> ModelKind:
    """The kind of model ``path`` holds, by its suffix.

    Raises:
        CompressError: the suffix is none of ``.onnx``, ``.plan``, ``.engine``, ``.pt``, ``.pth``.
    """
    suffix = Path(path).suffix
    if suffix == ONNX_SUFFIX:
        return ModelKind.onnx
    if suffix in ENGINE_SUFFIXES:
        return ModelKind.engine
    if suffix in CHECKPOINT_SUFFIXES:
        return ModelKind.checkpoint
    expected = ", ".join((ONNX_SUFFIX, *ENGINE_SUFFIXES, *CHECKPOINT_SUFFIXES[:-1]))
    raise CompressError(f"{path}: unknown model kind '{suffix}' (expected {expected} or {CHECKPOINT_SUFFIXES[-1]})")
