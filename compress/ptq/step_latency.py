"""The price of each step of an accuracy-budget search in engine latency: the model in that step's state (its
units float, the rest INT8) exported and timed in ONNX Runtime against the float model, interleaved
(:func:`compress.export.latency.measure`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from compress.export.latency import export_for_timing, measure
from compress.export.onnx import export_onnx
from compress.inputs import Inputs, take
from compress.ptq.fallback import Step
from compress.quant import Unit, quantizing

BATCH_SIZE = 8  # what the path's latency column is timed at
SECONDS = 1.0  # of timing per step (each step against the float model)


def step_latency(float_model: nn.Module, qmodel: nn.Module, units: Sequence[Unit], steps: Sequence[Step],
                 example: Inputs, workdir: Path, *, batch_size: int = BATCH_SIZE, seconds: float = SECONDS,
                 threads: int | None = None) -> list[dict[str, Any]]:
    """Per step: ``{step, batch_size, float_ms, ms, speedup}``, ``speedup`` being the median of float/step over
    pairs of runs timed back to back. ``units``: every unit of ``qmodel`` before the search put any in float;
    ``qmodel`` is left as it was."""
    float_path = export_for_timing(float_model, example, workdir / "float.onnx")
    rows = []
    for k, step in enumerate(steps):
        path = workdir / f"step{k}.onnx"
        with quantizing(qmodel, [u for u in units if u.name not in step.float_units], units):
            export_onnx(qmodel, take(example, slice(0, 1)), path)
        fig = measure(float_path, path, example, [batch_size], threads=threads, seconds=seconds)[0]
        rows.append({"step": k, "batch_size": batch_size, "float_ms": round(fig.before, 4), "ms": round(fig.after, 4),
                     "speedup": round(fig.speedup, 3)})
    return rows
