"""Engine latency of two models in ONNX Runtime (CPU, level ``all``, what users deploy with), interleaved.

Two ONNX files run round-robin (:func:`compress.export.bench.round_robin_ms`) so load from the rest of the
machine hits both alike; each pair of runs is timed back to back and the median ratio reported. Used where a
stage must say what its change did to the deployed engine: pruning (before/after) and the accuracy budget
(each step of the search against the float model).
"""

from __future__ import annotations

import copy
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compress.errors import CompressError, first_line
from compress.export.bench import round_robin_ms
from compress.export.onnx import export_onnx
from compress.export.onnxruntime import Optimization, session_feeds, session_options
from compress.inputs import Inputs, repeat_first, take

LEVEL = Optimization.all  # ONNX Runtime's own default, what users deploy with


@dataclass(frozen=True)
class EngineLatency:
    """Median ms per batch of the ``before`` (unpruned, float) and ``after`` engines at one batch size."""

    batch_size: int
    before: float
    after: float
    iters: int
    threads: int | None = None
    level: Optimization = LEVEL
    paired_speedup: float | None = None  # median over rounds of before/after, each pair timed back to back
    slower_share: float | None = None  # share of rounds in which the ``after`` engine was the slower one

    @property
    def speedup(self) -> float:
        if self.paired_speedup is not None:  # robust to load that drifts during the measurement
            return self.paired_speedup
        return self.before / self.after if self.after > 0 else float("inf")

    def to_report(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "before": round(self.before, 4), "after": round(self.after, 4),
                "speedup": round(self.speedup, 3), "slower_share": self.slower_share, "level": self.level.value,
                "threads": self.threads, "iters": self.iters}


def _session(path: Path, threads: int | None):  # noqa: ANN202 - ort type
    import onnxruntime as ort

    # sessions take turns: a spinning idle pool would steal the cores of the one being timed
    so = session_options(threads, LEVEL, spinning=False)
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types
        raise CompressError(f"ONNX Runtime cannot load {path.name}: {first_line(exc)}") from None


def export_for_timing(model: torch.nn.Module, example: Inputs, path: Path, opset: int = 13) -> Path:
    """``model`` as a dynamic-batch FP32 ONNX file at ``path`` (the model is left as it was)."""
    export_onnx(model, take(example, slice(0, 1)), path, opset=opset)
    return path


def _round_robin(sessions: Sequence[Any], paths: Sequence[Path], example: Inputs, batch_size: int, *,
                 seconds: float | None = None, iters: int | None = None) -> list[list[float]]:
    """ms per run of each session, taking turns (:func:`compress.export.bench.round_robin_ms`), on the example's
    first sample repeated ``batch_size`` times: its dtype (token ids stay int64) and a value range the model takes."""
    feeds = [session_feeds(s, repeat_first(example, batch_size), p.name) for s, p in zip(sessions, paths, strict=True)]
    runs = [lambda s=s, feed=feed: s.run(None, feed) for s, feed in zip(sessions, feeds, strict=True)]
    return round_robin_ms(runs, warmup=3, seconds=seconds, iters=iters)


def measure(before: Path, after: Path, example: Inputs, batch_sizes: Sequence[int], *,
            threads: int | None = None, seconds: float = 1.0) -> list[EngineLatency]:
    """Median latency of the ``before`` and ``after`` ONNX files, interleaved, at each batch size.

    ``seconds`` of timing in all, split evenly across the batch sizes.
    """
    sessions = [_session(before, threads), _session(after, threads)]
    figures = []
    for bs in batch_sizes:
        ms = _round_robin(sessions, [before, after], example, bs, seconds=seconds / len(batch_sizes))
        ratios = [b / a for b, a in zip(ms[0], ms[1], strict=True) if a > 0]
        slower = round(sum(a > b for b, a in zip(ms[0], ms[1], strict=True)) / len(ms[0]), 3)
        figures.append(EngineLatency(bs, statistics.median(ms[0]), statistics.median(ms[1]), len(ms[0]), threads,
                                     paired_speedup=statistics.median(ratios), slower_share=slower))
    return figures


def engine_latency(before: torch.nn.Module, after: torch.nn.Module, example: Inputs,
                   batch_sizes: Sequence[int], workdir: Path, *, threads: int | None = None,
                   seconds: float = 1.0) -> list[EngineLatency]:
    """Export ``before`` and ``after`` into a temporary folder inside ``workdir`` (removed afterwards) and time both."""
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir, prefix="latency-") as tmp:
        paths = [export_for_timing(m, example, Path(tmp) / f"{name}.onnx")
                 for name, m in (("before", before), ("after", after))]
        return measure(*paths, example, batch_sizes, threads=threads, seconds=seconds)


@dataclass(frozen=True)
class DeployedComparison:
    """The deployed engine against the input model's FP32 engine (and, for a quantized model, the same compressed
    structure in FP32), timed round-robin at one batch size in ONNX Runtime at level ``all``: what the report's
    plot puts on its latency axis. ``ms`` and ``bytes`` are keyed ``baseline``, ``float`` (quantized models
    only) and ``engine``."""

    batch_size: int
    ms: dict[str, float]
    bytes: dict[str, int]
    iters: int
    threads: int | None = None

    def to_report(self) -> dict[str, Any]:
        base = self.ms["baseline"]
        return {"batch_size": self.batch_size, "level": LEVEL.value, "threads": self.threads, "iters": self.iters,
                "ms": {k: round(v, 4) for k, v in self.ms.items()}, "bytes": self.bytes,
                "speedup": {k: round(base / v, 3) for k, v in self.ms.items() if k != "baseline" and v > 0}}


def float_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a quantized model with every quantizer off: its compressed structure, in float."""
    from compress.quant.quantizer import TensorQuantizer

    copy_ = copy.deepcopy(model)
    for m in copy_.modules():
        if isinstance(m, TensorQuantizer):
            m.quant_enabled = False
    return copy_


def compare_deployed(baseline: torch.nn.Module, model: torch.nn.Module, engine: Path, example: Inputs,
                     batch_size: int, workdir: Path, *, quantized: bool, iters: int, threads: int | None = None
                     ) -> DeployedComparison:
    """Export the baseline (and, when ``quantized``, :func:`float_copy` of ``model``) as FP32 ONNX into a temporary
    folder inside ``workdir`` and time them round-robin with the ``engine`` file, every session at level
    ``all`` with the engine's threads, for ``iters`` rounds (the engine's own ``bench_iters``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir, prefix="latency-") as tmp:
        paths = {"baseline": export_for_timing(baseline, example, Path(tmp) / "baseline.onnx")}
        if quantized:
            paths["float"] = export_for_timing(float_copy(model), example, Path(tmp) / "float.onnx")
        paths["engine"] = engine
        ms = _round_robin([_session(p, threads) for p in paths.values()], list(paths.values()), example, batch_size,
                          iters=iters)
        sizes = {k: p.stat().st_size for k, p in paths.items()}
    return DeployedComparison(batch_size, {k: statistics.median(t) for k, t in zip(paths, ms, strict=True)}, sizes,
                              len(ms[0]), threads)
