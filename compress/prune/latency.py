"""Engine latency before and after pruning: both models in ONNX Runtime (CPU, level ``all``), interleaved.

Fewer MACs do not always mean a faster engine: channel counts that are not multiples of 8 fall off
ONNX Runtime's NCHWc-blocked convolutions at level ``all`` (a MobileNetV2 pruned to half its MACs ran
3.4x *slower*). So the prune stage times what a user deploys, and says so when pruning made it slower.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from compress.errors import first_line
from compress.export.latency import LEVEL, EngineLatency, engine_latency, export_for_timing, measure

__all__ = ["LEVEL", "EngineLatency", "engine_latency", "export_for_timing", "measure", "run_advisory",
           "slowdown_warnings"]

T = TypeVar("T")
SLOWDOWN = 0.95  # median paired speedup below this ...
SLOWER_ROUNDS = 0.7  # ... with the pruned engine slower in at least this share of the paired rounds


def run_advisory(fn: Callable[[], T]) -> tuple[T | None, str | None]:
    """``(fn(), None)``, or ``(None, why)`` when exporting or timing fails: the measurement is advice, and a model
    that ONNX cannot take at opset 13 (or ONNX Runtime cannot run) still prunes."""
    try:
        return fn(), None
    except Exception as exc:  # export and ORT raise many types; none of them should fail the pruning
        return None, f"engine latency not measured ({first_line(exc)}); set latency_check: false to skip it"


def slowdown_warnings(figures: Sequence[EngineLatency], round_to: int, threshold: float = SLOWDOWN) -> list[str]:
    """One line per batch size at which the pruned engine is slower than the unpruned one beyond noise."""
    hint = (f"; channel counts that are not multiples of 8 (round_to: {round_to}) are a likely cause"
            if round_to % 8 else "")
    return [f"pruning made the engine slower: ONNX Runtime ({f.level.value}) batch {f.batch_size} runs "
            f"{f.after:.3f} ms vs {f.before:.3f} ms unpruned ({f.speedup:.2f}x){hint}"
            for f in figures if f.speedup < threshold and (f.slower_share is None or f.slower_share >= SLOWER_ROUNDS)]
