"""Latency per batch size, after warm-up: p50/p90/p99 and throughput (the export stage and ``compress bench``)."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.export.model_file import ModelKind, model_kind
from compress.export.onnxruntime import Optimization, OrtEngine
from compress.inputs import Inputs, call_model, repeat_first

# a p99 over fewer runs than this is the slowest run or next to it, not a percentile
P99_RUNS = 100


def _stats(times: list[float], bs: int) -> dict[str, float]:
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    return {
        "p50_ms": round(float(p50), 4),
        "p90_ms": round(float(p90), 4),
        "p99_ms": round(float(p99), 4),
        "throughput": round(bs / (float(p50) / 1000.0), 1),
        "runs": len(times),
    }


def round_robin_ms(
    calls: Sequence[Callable[[], object]], *, warmup: int = 5, iters: int | None = None, seconds: float | None = None,
    min_iters: int = 10, max_iters: int = 2000,
) -> list[list[float]]:
    """Wall-clock ms of each call per round, the calls taking turns: round ``i`` starts with call ``i mod n``
    (round-robin), so load from the rest of the machine and the order itself hit every call alike.

    Runs ``iters`` rounds, or else about ``seconds`` of wall time (at least ``min_iters``, at most
    ``max_iters`` rounds), after ``warmup`` calls of each.
    """
    for call in calls:
        for _ in range(warmup):
            call()
    times: list[list[float]] = [[] for _ in calls]
    deadline = time.perf_counter() + seconds if seconds is not None else None
    for i in range(iters if iters is not None else max_iters):
        if deadline is not None and i >= min_iters and time.perf_counter() > deadline:
            break
        for k in range(len(calls)):
            j = (i + k) % len(calls)
            start = time.perf_counter()
            calls[j]()
            times[j].append((time.perf_counter() - start) * 1000.0)
    return times


def latency_interleaved(
    runs: Sequence[Callable[[Any], object]],
    sample: Inputs,
    batch_sizes: Sequence[int] = (1, 8, 32),
    *,
    warmup: int = 5,
    iters: int | None = 20,
    seconds: float | None = None,
    min_iters: int = 10,
    max_iters: int = 100_000,
) -> list[dict[str, dict[str, float]]]:
    """Per run, ``{batch: {p50_ms, p90_ms, p99_ms, throughput, runs}}`` for a batch made by repeating
    ``sample``, the runs timed round-robin (:func:`round_robin_ms`): ``iters`` rounds per batch size, or
    with ``iters=None`` about ``seconds`` per batch size (``min_iters`` to ``max_iters`` rounds)."""
    results: list[dict[str, dict[str, float]]] = [{} for _ in runs]
    for bs in batch_sizes:
        x = repeat_first(sample, bs)
        times = round_robin_ms([functools.partial(run, x) for run in runs], warmup=warmup, iters=iters,
                               seconds=seconds, min_iters=min_iters, max_iters=max_iters)
        for j in range(len(runs)):
            results[j][str(bs)] = _stats(times[j], bs)
    return results


def latency(
    run: Callable[[Any], object],
    sample: Inputs,
    batch_sizes: Sequence[int] = (1, 8, 32),
    *,
    warmup: int = 5,
    iters: int = 20,
) -> dict[str, dict[str, float]]:
    """``{batch: {p50_ms, p90_ms, p99_ms, throughput}}`` of one run (see :func:`latency_interleaved`)."""
    return latency_interleaved([run], sample, batch_sizes, warmup=warmup, iters=iters)[0]


def runner_for(
    path: str | os.PathLike[str], threads: int | None = None, backend: str = "onnxruntime",
    batch_sizes: Sequence[int] = (1,), workdir: str | os.PathLike[str] | None = None,
    optimization: Optimization = Optimization.all, spinning: bool = True, trust: Sequence[str] = (),
) -> tuple[str, Callable[[Inputs], object]]:
    """``(backend, run)`` for a model file.

    ``.onnx`` runs in ONNX Runtime (``threads`` intra-op, graph ``optimization``, thread ``spinning``), or with ``backend="tensorrt"`` is first built
    into an engine in ``workdir`` (profile 1..max(batch_sizes)); ``.plan``/``.engine`` is a TensorRT
    engine; ``.pt``/``.pth`` a compress checkpoint in PyTorch eager, the baseline. TensorRT runs time
    host to host: the input is copied to the GPU and the output back, as a server sees it.

    Raises:
        CompressError: a missing file, an unknown kind, TensorRT or a GPU missing for an engine.
    """
    from compress.errors import CompressError
    from compress.export import tensorrt
    from compress.io import file_problem

    file = Path(path)
    if (problem := file_problem(file)) is not None:
        raise CompressError(f"{file}: {problem}")
    kind = model_kind(file)
    if kind is ModelKind.engine:
        return "tensorrt", _one_tensor(tensorrt.TrtEngine(file), file)
    if kind is ModelKind.onnx and backend == "tensorrt":
        if workdir is None:
            raise CompressError(f"{file}: building a TensorRT engine needs a work directory")
        top = max(batch_sizes)
        built, _ = tensorrt.build_engine(file, Path(workdir) / f"{file.stem}.plan", profile=tensorrt.Profile(1, top, top))
        return "tensorrt", _one_tensor(built, file)
    if kind is ModelKind.onnx:
        return "onnxruntime", OrtEngine(file, threads, optimization, spinning)
    from compress.models import load_model  # a checkpoint: model_kind raised for anything else

    model = load_model(file, trust=trust).eval()

    def eager(x: Inputs) -> object:
        before = torch.get_num_threads()
        if threads:  # for this call only: the caller's process keeps its own setting
            torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                return call_model(model, x)
        finally:
            torch.set_num_threads(before)

    return "torch", eager


def _one_tensor(engine: Callable[[torch.Tensor], object], file: Path) -> Callable[[Inputs], object]:
    """A TensorRT engine as a bench runner: our TensorRT path takes one input tensor (models of several inputs,
    token ids and masks, are refused in one line rather than fed wrongly)."""
    from compress.errors import CompressError

    def run(x: Inputs) -> object:
        if not isinstance(x, torch.Tensor):
            raise CompressError(f"{file}: the TensorRT backend here runs models of one input tensor; this one has "
                                "several: time it with --backend onnxruntime")
        return engine(x)

    return run


def compare(
    paths: Sequence[str | os.PathLike[str]],
    sample: Inputs,
    batch_sizes: Sequence[int],
    *,
    threads: int | None = None,
    backend: str = "onnxruntime",
    warmup: int = 5,
    iters: int | None = 20,
    seconds: float | None = None,
    min_iters: int = 10,
    optimization: Optimization = Optimization.all,
    trust: Sequence[str] = (),
) -> dict[str, Any]:
    """Latency of each model at each batch size, and the batch size with the best throughput per model.

    ``sample`` is one sample (a tensor, or a tuple/dict of them for several inputs); ``iters`` rounds are
    timed per batch size, or with ``iters=None`` about ``seconds`` (at least ``min_iters`` rounds).

    The models are timed round-robin (:func:`latency_interleaved`). With more than one model, ONNX
    Runtime sessions run with thread spinning off: a session's threads spin on after its run and would
    take the cores from the next model's (measured: resnet18 INT8/FP32 0.32 became 0.47).

    Args:
        backend: what runs ``.onnx`` files: ``onnxruntime`` or ``tensorrt`` (built for the run).
        optimization: ONNX Runtime's graph optimisation level (default ``all``, as a deployed session).

    Raises:
        CompressError: a model cannot be loaded or fails on the sample input.
    """
    import tempfile

    from compress.errors import CompressError, first_line

    spinning = len(paths) < 2
    with tempfile.TemporaryDirectory(prefix="compress-bench-") as workdir:
        runners = [runner_for(p, threads, backend, batch_sizes, workdir, optimization, spinning, trust) for p in paths]
        for path, (_, run) in zip(paths, runners, strict=True):
            try:  # one call each first, so a failure names its model
                run(repeat_first(sample, 1))
            except CompressError:
                raise
            except Exception as exc:  # the model cannot take this input
                raise CompressError(f"{path}: fails on an input of shape {_shapes(sample)}: "
                                    f"{first_line(exc)}") from None
        timings = latency_interleaved([run for _, run in runners], sample, batch_sizes, warmup=warmup, iters=iters,
                                      seconds=seconds, min_iters=min_iters)
    models: list[dict[str, Any]] = []
    for path, (used, _), timing in zip(paths, runners, timings, strict=True):
        best = max(timing, key=lambda bs: timing[bs]["throughput"])
        ort = used == "onnxruntime"
        models.append({"path": str(path), "backend": used, "threads": threads if used != "tensorrt" else None,
                       "optimization": optimization.value if ort else None, "spinning": spinning if ort else None,
                       "latency": timing, "best_batch_size": int(best)})
    return {"batch_sizes": list(batch_sizes), "interleaved": True, "optimization": optimization.value,
            "spinning": spinning, "iters": iters, "seconds": seconds if iters is None else None,
            "min_iters": min_iters if iters is None else None, "models": models}


def _shapes(sample: Inputs) -> str:
    """One sample's shape(s) without the batch: ``[1, 8, 8]``, or ``{name: [...], ...}`` for several inputs."""
    if isinstance(sample, torch.Tensor):
        return str(list(sample.shape[1:]))
    items = sample.items() if isinstance(sample, dict) else enumerate(sample)
    return "{" + ", ".join(f"{k}: {list(t.shape[1:])}" for k, t in items) + "}"


def table(results: dict[str, Any]) -> list[str]:
    """The printed form of :func:`compare`'s results: each model's whole path on a line of its own, a row per
    batch size under it (with the number of timed runs), then how they were timed."""
    lines = [f"{'batch':>7} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'samples/s':>10} {'runs':>7}"]
    for entry in results["models"]:
        lines.append(f"{entry['path']} ({entry['backend']})")
        for bs, t in entry["latency"].items():
            mark = "  <- best" if int(bs) == entry["best_batch_size"] else ""
            lines.append(f"{bs:>7} {t['p50_ms']:>9.3f} {t['p90_ms']:>9.3f} {t['p99_ms']:>9.3f} "
                         f"{t['throughput']:>10.1f} {t['runs']:>7}{mark}")
    how = ["models timed round-robin"] if len(results["models"]) > 1 else []
    if any(e["backend"] == "onnxruntime" for e in results["models"]):
        how.append(f"onnxruntime optimization {results['optimization']}, thread spinning "
                   f"{'on' if results['spinning'] else 'off'}")
    if results.get("iters") is not None:
        how.append(f"{results['iters']} runs per batch size")
    elif results.get("seconds") is not None:
        how.append(f"about {results['seconds']:g} s per batch size, at least {results['min_iters']} runs")
    fewest = min((t["runs"] for e in results["models"] for t in e["latency"].values()), default=P99_RUNS)
    if fewest < P99_RUNS:
        how.append(f"p99 over fewer than {P99_RUNS} runs is about the slowest run")
    return lines + ([f"({'; '.join(how)})"] if how else [])
