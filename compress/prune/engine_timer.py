"""Candidates of a latency search timed on the engine they deploy to, interleaved with the unpruned engine.

Each model is exported the way it ships (FP32, float16 casts, or INT8 Q/DQ from a quickly calibrated copy
when the recipe quantizes later), loaded as the engine (ONNX Runtime at the deployed optimisation level, or a
TensorRT plan) and timed round-robin against the unpruned engine (:func:`compress.export.bench.round_robin_ms`),
so load from the rest of the machine hits both alike. ``repeats`` runs of ``rounds`` paired rounds each give
the measured spread that :class:`compress.prune.latency_search.Timing` reports.
"""

from __future__ import annotations

import copy
import shutil
import statistics
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from torch import nn

from compress import quant
from compress.export import tensorrt
from compress.export.bench import round_robin_ms
from compress.export.fp16 import to_fp16
from compress.export.latency import export_for_timing
from compress.export.onnxruntime import OrtEngine
from compress.export.options import Precision
from compress.inputs import Inputs, move_inputs, repeat_first
from compress.optimization_level import Optimization
from compress.prune.latency_search import Timing
from compress.prune.latency_target import Backend
from compress.ptq.calibrate import calibrate
from compress.ptq.calibrators import Method
from compress.quant.spec import Target

# Samples the INT8 copies are calibrated on: the scales do not change which kernels run, only the accuracy,
# which the later ptq/qat stage sets with the recipe's own calibrator and data.
INT8_SAMPLES = 32


@dataclass(frozen=True)
class Int8:
    """The model is quantized later: time INT8 engines of copies calibrated on a few batches of ``data``."""

    data: Iterable  # batches of (inputs, labels) or inputs, as compress.ptq.calibrate takes them
    target: Target = Target.onnxruntime
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    attention: quant.Attention = quant.Attention.int8
    samples: int = INT8_SAMPLES


@dataclass(frozen=True)
class Engine:
    """How the deployed engine is built: the export stage's engine settings (ONNX Runtime: level ``all``)."""

    backend: Backend = Backend.onnxruntime
    threads: int | None = None
    optimization: Optimization = Optimization.all  # ONNX Runtime only
    precision: Precision = Precision.fp32
    keep_fp32: tuple[str, ...] = ()  # with fp16: op types or node names left in float32
    int8: Int8 | None = None
    opset: int = 13  # the export stage's: the engine runs what that opset exports (e.g. LayerNormalization at 17)

    def describe(self) -> dict[str, Any]:
        """The settings as report.json names them next to every figure."""
        ort = self.backend is Backend.onnxruntime
        return {"backend": self.backend.value, "optimization": self.optimization.value if ort else None,
                "threads": self.threads if ort else None, "precision": "int8" if self.int8 else self.precision.value,
                "int8_target": self.int8.target.value if self.int8 else None,
                "int8_calibration": f"max, {self.int8.samples} samples" if self.int8 else None, "opset": self.opset}


class EngineTimer:
    """Times models against ``unpruned`` on ``engine`` at ``batch_size``; files live in a folder under ``workdir``.

    Use as a context manager (the folder and the sessions go on exit).
    """

    def __init__(self, unpruned: nn.Module, example: Inputs, engine: Engine, batch_size: int, *, workdir: Path,
                 repeats: int, rounds: int) -> None:
        self.example, self.engine, self.batch_size = move_inputs(example, "cpu"), engine, batch_size
        self.repeats, self.rounds = repeats, rounds
        workdir.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(dir=workdir, prefix="latency-search-"))
        self._count = 0
        try:
            self._unpruned = self._runner(self._export(unpruned, "unpruned"))
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> EngineTimer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def __call__(self, model: nn.Module) -> Timing:
        """``model``'s latency over the unpruned engine's: the median, min and max of ``repeats`` runs."""
        return self.together([model])[0]

    def together(self, models: Sequence[nn.Module]) -> list[Timing]:
        """Each model's latency over the unpruned engine's, all engines taking turns in the same runs.

        For comparing finished models (pruned by different methods) at once: a burst of load elsewhere
        hits every engine of a round alike, so their ratios stay comparable with one another. Compare ratios
        within one call only: among more engines each runs on caches the others evicted, which slows each by
        its own share, so the ratios differ from paired ones (batch 8 at 64x64 among six engines: MobileNetV2's
        unpruned engine 4.8 -> 10.3 ms and a pruned copy x0.50 -> x0.34; ResNet-18's pruned copies x0.45-0.47
        -> x0.47-0.65). A target is checked on paired ratios (:meth:`__call__`), as the search does.
        """
        paths, runs = [], []
        for model in models:
            self._count += 1
            paths.append(self._export(model, f"candidate{self._count}"))
            runs.append(self._runner(paths[-1]))
        ratios: list[list[float]] = [[] for _ in runs]
        ms: list[list[float]] = [[] for _ in runs]
        unpruned_ms: list[float] = []
        for k in range(self.repeats):
            before, *after = round_robin_ms([self._unpruned, *runs], warmup=3 if k == 0 else 1, iters=self.rounds)
            unpruned_ms += before
            for j, times in enumerate(after):
                ratios[j].append(statistics.median(a / b for b, a in zip(before, times, strict=True) if b > 0))
                ms[j] += times
        del runs  # the sessions go before the next candidates are built
        for path in paths:
            path.unlink(missing_ok=True)
        unpruned = statistics.median(unpruned_ms)
        return [Timing.from_runs(r, statistics.median(m), unpruned) for r, m in zip(ratios, ms, strict=True)]

    # ------------------------------------------------------------------------------------------

    def _export(self, model: nn.Module, name: str) -> Path:
        path = self.folder / f"{name}.onnx"
        shipped = model if self.engine.int8 is None else _calibrated_copy(model, self.example, self.engine.int8)
        export_for_timing(shipped, self.example, path, opset=self.engine.opset)
        if self.engine.precision is Precision.fp16:
            proto, _ = to_fp16(onnx.load(str(path)), keep_fp32=self.engine.keep_fp32)
            onnx.save(proto, str(path))
        return path

    def _runner(self, path: Path) -> Callable[[], object]:
        x = repeat_first(self.example, self.batch_size)
        if self.engine.backend is Backend.tensorrt:
            bs = self.batch_size
            built, _ = tensorrt.build_engine(path, path.with_suffix(".plan"), profile=tensorrt.Profile(bs, bs, bs))
            xs = x.to(built.device)  # device-side timing: both engines alike, no host copy in the figure
            return lambda: built.infer(xs)
        # spinning off: two sessions take turns, and an idle one's spinning threads would steal the cores
        eng = OrtEngine(path, self.engine.threads, self.engine.optimization, spinning=False)
        feeds = eng.feeds(x)
        return lambda: eng.session.run(None, feeds)


def _calibrated_copy(model: nn.Module, example: Inputs, int8: Int8) -> nn.Module:
    """A quantized copy of ``model`` (the later stage's target and layer choice), max-calibrated on a few samples."""
    qmodel = quant.prepare(copy.deepcopy(model).cpu().eval(), int8.target, include=int8.include, exclude=int8.exclude,
                           attention=int8.attention, example_input=example)
    calibrate(qmodel, int8.data, Method.max, limit=int8.samples, device="cpu", where="latency search (INT8 copy)")
    return qmodel

