"""Shared timing helper for the benchmark scripts (run them as `python benchmarks/NAME.py`)."""

import time
from collections.abc import Callable


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` wall-clock runs of ``fn``, in seconds (least disturbed by other load)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved_ms(runners: dict[str, Callable[[], object]], iters: int, warmup: int = 5) -> dict[str, list[float]]:
    """Wall-clock ms of each runner over ``iters`` runs after ``warmup``; the runners take turns run by run,
    so background load hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(warmup + iters):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1000)
    return times
