"""Latency per batch size, after warm-up: p50/p90/p99 and throughput (the export stage and ``compress bench``)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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


def runner_for(
    path: str | os.PathLike[str], threads: int | None = None, backend: str = "onnxruntime",
    batch_sizes: Sequence[int] = (1,), workdir: str | os.PathLike[str] | None = None,
) -> tuple[str, Callable[[torch.Tensor], object]]:
    """``(backend, run)`` for a model file.

    ``.onnx`` runs in ONNX Runtime (``threads`` intra-op), or with ``backend="tensorrt"`` is first built
    into an engine in ``workdir`` (profile 1..max(batch_sizes)); ``.plan``/``.engine`` is a TensorRT
    engine; ``.pt``/``.pth`` a compress checkpoint in PyTorch eager, the baseline. TensorRT runs time
    host to host: the input is copied to the GPU and the output back, as a server sees it.

    Raises:
        CompressError: a missing file, an unknown kind, TensorRT or a GPU missing for an engine.
    """
    from compress.errors import CompressError
    from compress.export import tensorrt

    file = Path(path)
    if not file.is_file():
        raise CompressError(f"{file}: no such file")
    if file.suffix in tensorrt.ENGINE_SUFFIXES:
        return "tensorrt", tensorrt.TrtEngine(file)
    if file.suffix == ".onnx" and backend == "tensorrt":
        if workdir is None:
            raise CompressError(f"{file}: building a TensorRT engine needs a work directory")
        top = max(batch_sizes)
        built, _ = tensorrt.build_engine(file, Path(workdir) / f"{file.stem}.plan", profile=tensorrt.Profile(1, top, top))
        return "tensorrt", built
    if file.suffix == ".onnx":
        from compress.export.onnxruntime import Optimization, OrtEngine

        return "onnxruntime", OrtEngine(file, threads, Optimization.extended)
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
    raise CompressError(f"{file}: unknown model kind '{file.suffix}' (expected .onnx, .plan, .engine, .pt or .pth)")


def compare(
    paths: Sequence[str | os.PathLike[str]],
    sample: torch.Tensor,
    batch_sizes: Sequence[int],
    *,
    threads: int | None = None,
    backend: str = "onnxruntime",
    warmup: int = 5,
    iters: int = 20,
) -> dict[str, Any]:
    """Latency of each model at each batch size, and the batch size with the best throughput per model.

    Args:
        backend: what runs ``.onnx`` files: ``onnxruntime`` or ``tensorrt`` (built for the run).

    Raises:
        CompressError: a model cannot be loaded or fails on the sample input.
    """
    import tempfile

    from compress.errors import CompressError, first_line

    models: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="compress-bench-") as workdir:
        for path in paths:
            used, run = runner_for(path, threads, backend, batch_sizes, workdir)
            try:
                timings = latency(run, sample, batch_sizes, warmup=warmup, iters=iters)
            except CompressError:
                raise
            except Exception as exc:  # the model cannot take this input
                raise CompressError(f"{path}: fails on an input of shape {list(sample.shape[1:])}: "
                                    f"{first_line(exc)}") from None
            best = max(timings, key=lambda bs: timings[bs]["throughput"])
            models.append({"path": str(path), "backend": used, "threads": threads if used != "tensorrt" else None,
                           "latency": timings, "best_batch_size": int(best)})
    return {"batch_sizes": list(batch_sizes), "models": models}


def table(results: dict[str, Any]) -> list[str]:
    """The printed form of :func:`compare`'s results."""
    lines = [f"{'model':<40} {'backend':<12} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'samples/s':>10}"]
    for entry in results["models"]:
        for bs, t in entry["latency"].items():
            mark = "  <- best" if int(bs) == entry["best_batch_size"] else ""
            lines.append(f"{entry['path'][-40:]:<40} {entry['backend']:<12} {bs:>5} {t['p50_ms']:>9.3f} "
                         f"{t['p90_ms']:>9.3f} {t['p99_ms']:>9.3f} {t['throughput']:>10.1f}{mark}")
    return lines
