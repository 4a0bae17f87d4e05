"""Latency per batch size, after warm-up: p50/p90/p99 and throughput (the export stage and ``compress bench``)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch


def latency(
    run: Callable[[torch.Tensor], object],
    sample: torch.Tensor,
    batch_sizes: Sequence[int] = (1, 8, 32),
    *,
    warmup: int = 5,
    iters: int = 20,
) -> dict[str, dict[str, float]]:
    """``{batch: {p50_ms, p90_ms, p99_ms, throughput}}`` for a batch made by repeating ``sample``."""
    results: dict[str, dict[str, float]] = {}
    for bs in batch_sizes:
        x = sample[:1].expand(bs, *sample.shape[1:]).contiguous()
        for _ in range(warmup):
            run(x)
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            run(x)
            times.append((time.perf_counter() - start) * 1000.0)
        p50, p90, p99 = np.percentile(times, [50, 90, 99])
        results[str(bs)] = {
            "p50_ms": round(float(p50), 4),
            "p90_ms": round(float(p90), 4),
            "p99_ms": round(float(p99), 4),
            "throughput": round(bs / (float(p50) / 1000.0), 1),
        }
    return results


def runner_for(path: str | os.PathLike[str], threads: int | None = None) -> tuple[str, Callable[[torch.Tensor], object]]:
    """``(backend, run)`` for an ONNX file (ONNX Runtime, ``threads`` intra-op) or a compress checkpoint (eager).

    Raises:
        CompressError: a missing file, a TensorRT engine (its backend is not part of this version), an unknown kind.
    """
    from compress.errors import CompressError

    file = Path(path)
    if not file.is_file():
        raise CompressError(f"{file}: no such file")
    if file.suffix in (".plan", ".engine"):
        raise CompressError(f"{file}: TensorRT engines need the tensorrt backend, which this version does not include")
    if file.suffix == ".onnx":
        from compress.export.onnxruntime import Optimization, OrtEngine

        engine = OrtEngine(file, threads, Optimization.extended)
        return "onnxruntime", engine
    if file.suffix in (".pt", ".pth"):
        from compress.models import load_model

        model = load_model(file).eval()

        def eager(x: torch.Tensor) -> object:
            before = torch.get_num_threads()
            if threads:  # for this call only: the caller's process keeps its own setting
                torch.set_num_threads(threads)
            try:
                with torch.inference_mode():
                    return model(x)
            finally:
                torch.set_num_threads(before)

        return "torch", eager
    raise CompressError(f"{file}: unknown model kind '{file.suffix}' (expected .onnx, .pt or .pth)")


def compare(
    paths: Sequence[str | os.PathLike[str]],
    sample: torch.Tensor,
    batch_sizes: Sequence[int],
    *,
    threads: int | None = None,
    warmup: int = 5,
    iters: int = 20,
) -> dict[str, object]:
    """Latency of each model at each batch size, and the batch size with the best throughput per model.

    Raises:
        CompressError: a model cannot be loaded or fails on the sample input.
    """
    from compress.errors import CompressError, first_line

    results: dict[str, object] = {"batch_sizes": list(batch_sizes), "models": []}
    for path in paths:
        backend, run = runner_for(path, threads)
        try:
            timings = latency(run, sample, batch_sizes, warmup=warmup, iters=iters)
        except CompressError:
            raise
        except Exception as exc:  # the model cannot take this input
            raise CompressError(f"{path}: fails on an input of shape {list(sample.shape[1:])}: {first_line(exc)}") from None
        best = max(timings, key=lambda bs: timings[bs]["throughput"])
        results["models"].append({"path": str(path), "backend": backend, "threads": threads,  # type: ignore[union-attr]
                                  "latency": timings, "best_batch_size": int(best)})
    return results


def table(results: dict[str, object]) -> list[str]:
    """The printed form of :func:`compare`'s results."""
    lines = [f"{'model':<40} {'backend':<12} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'samples/s':>10}"]
    for entry in results["models"]:  # type: ignore[union-attr]
        for bs, t in entry["latency"].items():
            mark = "  <- best" if int(bs) == entry["best_batch_size"] else ""
            lines.append(f"{entry['path'][-40:]:<40} {entry['backend']:<12} {bs:>5} {t['p50_ms']:>9.3f} "
                         f"{t['p90_ms']:>9.3f} {t['p99_ms']:>9.3f} {t['throughput']:>10.1f}{mark}")
    return lines
