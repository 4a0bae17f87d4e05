"""Pruning to a latency target: the engine settings resolved, candidates built and timed, the ratio chosen.

Shared by the ``prune`` stage and ``compress.prune.channels(..., latency=...)``; the pruner is used through
:class:`Pruner` (what :class:`compress.prune.channel.ChannelPruner` offers), so this module sits beside it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from compress.errors import CompressError
from compress.export.options import OnnxRuntimeEngine, TensorRTEngine
from compress.profile import count_macs, count_params
from compress.prune.engine_timer import Engine, EngineTimer, Int8
from compress.prune.latency_search import Candidate, LatencySearch, Probe, search
from compress.prune.latency_target import Backend, LatencyTarget, engine_multiple, unavailable


class Pruner(Protocol):
    model: nn.Module
    example: Any
    macs_before: int

    def pruned_copy(self, ratio: float) -> nn.Module | None: ...


def backend_of(latency: LatencyTarget, deployed: OnnxRuntimeEngine | TensorRTEngine | None) -> Backend:
    """The backend to time on: the one asked, else the deployed engine's, else ONNX Runtime."""
    if latency.backend is not None:
        return latency.backend
    return Backend(deployed.backend) if deployed is not None else Backend.onnxruntime


def default_round_to(latency: LatencyTarget, deployed: OnnxRuntimeEngine | TensorRTEngine | None, int8: bool) -> int:
    """The channel multiple the timed engine runs fast (:func:`compress.prune.latency_target.engine_multiple`)."""
    return engine_multiple(backend_of(latency, deployed), int8)


def resolve_engine(latency: LatencyTarget, deployed: OnnxRuntimeEngine | TensorRTEngine | None, int8: Int8 | None,
                   where: str, deployed_at: str = "the export stage's engine", opset: int = 13) -> Engine:
    """The engine to time candidates on: the deployed engine's settings (and the export's ``opset``), with
    ``latency``'s backend/threads.

    Raises:
        CompressError: ``latency.backend`` differs from the deployed engine's, or cannot run here (naming
            what is missing).
    """
    backend = backend_of(latency, deployed)
    if deployed is not None and latency.backend is not None and latency.backend.value != deployed.backend:
        raise CompressError(f"{where}.latency.backend: is {latency.backend.value} but {deployed_at} is "
                            f"{deployed.backend}; time the engine you deploy (leave backend out to follow it)")
    why = unavailable(backend)
    if why is not None:
        raise CompressError(f"{where}.latency.backend: {backend.value} cannot run here: {why}; use backend: onnxruntime")
    ort = deployed if isinstance(deployed, OnnxRuntimeEngine) else None
    settings: dict[str, Any] = {"backend": backend, "int8": int8, "opset": opset,
                                "threads": latency.threads or (ort.threads if ort is not None else None)}
    if ort is not None:
        settings["optimization"] = ort.optimization
    if deployed is not None and deployed.backend == backend.value:
        settings |= {"precision": deployed.precision, "keep_fp32": tuple(deployed.keep_fp32)}
    return Engine(**settings)


def api_engine(latency: LatencyTarget, engine: Engine | OnnxRuntimeEngine | TensorRTEngine | None,
                where: str) -> Engine:
    """The engine the API times on: an :class:`Engine` as given (with ``latency``'s backend and threads
    checked against it), or one resolved from the export engine options."""
    if not isinstance(engine, Engine):
        return resolve_engine(latency, engine, None, where, "engine")
    if latency.backend is not None and latency.backend is not engine.backend:
        raise CompressError(f"{where}.latency.backend: is {latency.backend.value} but engine.backend is "
                            f"{engine.backend.value}")
    why = unavailable(engine.backend)
    if why is not None:
        raise CompressError(f"{where}.engine.backend: {engine.backend.value} cannot run here: {why}")
    return replace(engine, threads=latency.threads) if latency.threads is not None else engine


def search_latency(pruner: Pruner, latency: LatencyTarget, engine: Engine, workdir: Path,
                   round_to: int) -> LatencySearch:
    """Build and time ``latency.candidates`` pruned copies of ``pruner``'s model; the model is left unpruned.

    Raises:
        CompressError: the unpruned model cannot be exported or loaded by the engine, or a candidate breaks.
    """
    start = time.perf_counter()
    example = pruner.example

    def build(ratio: float) -> Probe | None:
        model = pruner.pruned_copy(ratio)
        return None if model is None else Probe(model, count_macs(model, example), count_params(model))

    with torch.no_grad(), EngineTimer(pruner.model, example, engine, latency.batch_size, workdir=workdir,
                                      repeats=latency.repeats, rounds=latency.rounds) as timer:
        found = search(build, timer, latency.target, latency.candidates, pruner.macs_before,
                       count_params(pruner.model))
    if not found.candidates:
        raise CompressError(f"latency search: no candidate could be timed ({found.stopped})")
    found.seconds = time.perf_counter() - start
    found.engine = {**engine.describe(), "batch_size": latency.batch_size, "repeats": latency.repeats,
                    "rounds": latency.rounds, "round_to": round_to,
                    "met_rule": "median ratio <= target + half the interquartile range of the repeated runs"}
    return found


def time_final(found: LatencySearch, unpruned: nn.Module, model: nn.Module, example: Any, latency: LatencyTarget,
               engine: Engine, workdir: Path) -> Candidate:
    """``model`` (what several pruning steps left) timed against ``unpruned`` the way the search timed its
    candidates; recorded as ``found.final`` and counted in ``found.seconds``."""
    start = time.perf_counter()
    with torch.no_grad(), EngineTimer(unpruned, example, engine, latency.batch_size, workdir=workdir,
                                      repeats=latency.repeats, rounds=latency.rounds) as timer:
        timing = timer(model)
    macs = count_macs(model, example)
    found.final = Candidate(len(found.candidates), found.chosen.ratio if found.chosen else 0.0, macs,
                            count_params(model), found.macs_before / max(macs, 1), timing,
                            met=timing.ratio <= latency.target + timing.noise)
    found.seconds += time.perf_counter() - start
    return found.final
