"""ONNX Runtime's graph optimisation levels: a torch-free module, so the CLI can offer them without loading torch."""

from __future__ import annotations

from enum import Enum


class Optimization(str, Enum):
    """ONNX Runtime's graph optimisation levels, lowest first."""

    disabled = "disabled"  # the ONNX file as written (Q/DQ run as float ops)
    basic = "basic"
    # 'extended' is the highest level whose saved model stays portable across CPUs; 'all' adds
    # layout transforms tied to this machine's instruction set.
    extended = "extended"
    all = "all"  # ONNX Runtime's own default: what a user's InferenceSession runs at
