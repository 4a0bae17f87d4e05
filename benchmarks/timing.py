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
    starting one further along each round (round-robin), so background load and the order itself hit all
    alike. Time ONNX Runtime sessions side by side with thread spinning off (``OrtEngine(.., spinning=False)``):
    a session's threads spin on after its run and take the cores from the next one."""
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + iters):
        for k in range(len(names)):
            name = names[(i + k) % len(names)]
            start = time.perf_counter()
            runners[name]()
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1000)
    return times


def cuda_ms(fn: Callable[[], object], samples: int, reps: int, warmup: int) -> list[float]:
    """Per-call GPU ms: ``samples`` CUDA-event-timed runs of ``reps`` back-to-back calls each (the CPU queues
    ahead, so small shapes are not timed as launch gaps), after ``warmup`` calls."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / reps for start, end in events]
