"""How much to prune, said as engine latency: ``latency: {target: 0.5, batch_size: 8, backend: onnxruntime}``.

The target is the pruned engine's latency over the unpruned engine's, both built the way the model is
deployed and timed on this machine (:mod:`compress.prune.engine_timer`); :mod:`compress.prune.latency_search`
finds the pruning ratio. This module holds the options and the channel multiples each engine runs fast.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError

from compress.config import Strict, describe_error
from compress.errors import CompressError
from compress.export.tensorrt import why_unavailable

# Candidates and repeated runs per candidate: the search's whole cost is CANDIDATES engines built and timed,
# each in REPEATS interleaved runs of ROUNDS paired rounds (plus one warm-up round each).
CANDIDATES = 6
REPEATS = 5
ROUNDS = 5


class Backend(str, Enum):
    onnxruntime = "onnxruntime"  # CPU execution provider
    tensorrt = "tensorrt"


class LatencyTarget(Strict):
    """Prune until the engine runs in ``target`` times the unpruned engine's latency (``0.5``: twice as fast).

    ``backend``/``threads`` default to the export stage's engine where the recipe has one.
    """

    target: Annotated[float, Field(gt=0, lt=1)]
    batch_size: Annotated[int, Field(ge=1, le=65536)] = 8
    backend: Backend | None = None  # None: the export stage's engine backend, else onnxruntime
    threads: Annotated[int, Field(ge=1, le=1024)] | None = None  # None: the export engine's, else ONNX Runtime's default
    candidates: Annotated[int, Field(ge=1, le=64)] = CANDIDATES  # engines built and timed (the search's cost)
    repeats: Annotated[int, Field(ge=2, le=100)] = REPEATS  # interleaved runs per candidate: the measured spread
    rounds: Annotated[int, Field(ge=1, le=10_000)] = ROUNDS  # paired rounds (unpruned, candidate) per run


def latency_target(value: LatencyTarget | Mapping[str, Any] | float, where: str) -> LatencyTarget:
    """``value`` (options, a mapping of them, or the bare target) as :class:`LatencyTarget`.

    Raises:
        CompressError: an option out of range or unknown, one line naming it.
    """
    if isinstance(value, LatencyTarget):
        return value
    try:
        return LatencyTarget(**value) if isinstance(value, Mapping) else LatencyTarget(target=value)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise CompressError(f"{where}{'.' + field if field else ''}: {describe_error(err)}") from None


def unavailable(backend: Backend) -> str | None:
    """Why engines of ``backend`` cannot be built and timed here (what is missing), or None."""
    return why_unavailable() if backend is Backend.tensorrt else None


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def ort_block_size(flags: set[str] | None = None) -> int:
    """The NCHWc block of ONNX Runtime's CPU convolutions (MLAS) on this CPU: 16 with AVX-512F, else 8.

    ONNX Runtime's NCHWc transformer (``onnxruntime/core/optimizer/nchwc_transformer.cc``, level ``all``)
    moves a Conv to the blocked kernels only when its output channels (and input channels, but for the
    network's first conv) are multiples of ``MlasNchwcGetBlockSize()``, which ``mlas/lib/platform.cpp`` sets
    to 8 (AVX2) or 16 (AVX-512F). Off the block, a layer runs the slower plain NCHW kernels with reorders
    around it (a MobileNetV2 pruned to half its MACs ran 3.4x slower unrounded).
    """
    return 16 if "avx512f" in (flags if flags is not None else _cpu_flags()) else 8


def engine_multiple(backend: Backend, int8: bool) -> int:
    """The channel multiple ``backend`` runs fast, the default ``round_to`` when pruning to a latency.

    ONNX Runtime CPU: :func:`ort_block_size` (FP32 and INT8 alike: the INT8 GEMMs pack 16 columns too).
    TensorRT: 8 for FP16 and 32 for INT8 tensor-core kernels (TensorRT Developer Guide, "Optimizing for
    Tensor Cores"; engine layers report formats such as "channel % 8 == 0", NVIDIA/TensorRT#3876).
    """
    if backend is Backend.tensorrt:
        return 32 if int8 else 8
    return ort_block_size()
