"""Latency of a callable per batch size, after warm-up: p50/p90/p99 and throughput."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

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
