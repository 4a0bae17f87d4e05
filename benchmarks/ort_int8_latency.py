"""ONNX Runtime CPU: our onnxruntime-target INT8 export against FP32 and against ORT's own quantize_static.

usage: python benchmarks/ort_int8_latency.py [--levels extended,all] [--models resnet18,mobilenet_v2]
                                            [--threads 2] [--iters 60] [--skip-accuracy]

Latency: torchvision resnet18 and mobilenet_v2 (num_classes 10, random init with seed 0: latency
does not depend on the weights) at 224x224, batch 8, p50 over ``--iters`` runs after 5 warm-up runs.
  (1) FP32: the float model through ``export_onnx``.
  (2) ours: ``quant.prepare(.., "onnxruntime")`` + ``ptq.calibrate(.., "max")`` on 256 digits images
      upscaled to 224 RGB, ``export_onnx(.., target="onnxruntime")``.
  (3) theirs: ``quant_pre_process`` then ``quantize_static`` on (1): QDQ, per_channel, QUInt8
      activations, QInt8 weights, MinMax, the same 256 images through a CalibrationDataReader.
Each is saved by ``build_engine`` at the portable level (at most ``extended``), as the export stage
does, and timed in a session at each of ``--levels`` (default ``extended`` and ``all``, ONNX Runtime's
own default and what the export stage times at). All sessions of a model (3 engines x levels) are
timed round-robin, in a rotating order, with thread spinning off, so neither background load nor the
order nor an idle session's spinning threads favour one.
Targets: ours / FP32 <= 0.22, ours / quantize_static <= 1.1.

Accuracy at the models' real resolution (resnet18 digits 32x32 RGB, digits_cnn 8x8): top1 on the
digits test split of our INT8 engine vs quantize_static's, both calibrated on the same 512 train
samples, with max vs MinMax and percentile 99.99 vs Percentile 99.99. Target: ours >= theirs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))

import bench_models  # noqa: E402
from timing import interleaved_ms  # noqa: E402

from compress import ptq, quant  # noqa: E402
from compress.export.onnx import export_onnx  # noqa: E402
from compress.export.onnxruntime import Optimization, OrtEngine, build_engine, int8_summary, portable  # noqa: E402

ORT_METHODS = {"max": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}


class LoaderReader(CalibrationDataReader):
    """Feeds the batches of a loader to quantize_static's calibration."""

    def __init__(self, loader: DataLoader) -> None:
        self.batches = [x.numpy() for x, _ in loader]
        self.index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.batches):
            return None
        self.index += 1
        return {"input": self.batches[self.index - 1]}

    def rewind(self) -> None:
        self.index = 0


class Builder:
    """Exports and builds engines into one temporary folder with one set of session options."""

    def __init__(self, folder: Path, threads: int, level: Optimization) -> None:
        self.folder, self.threads, self.level = folder, threads, level

    def engine(self, onnx_path: Path, level: Optimization | None = None) -> OrtEngine:
        """The engine file saved at the portable level, in a session at ``level`` (default the builder's)
        with thread spinning off (sessions are timed side by side)."""
        level = level or self.level
        path = onnx_path.with_suffix(f".engine-{portable(level).value}.onnx")
        if not path.exists():
            build_engine(onnx_path, path, threads=self.threads, level=portable(level))
        return OrtEngine(path, self.threads, level, spinning=False)

    def fp32(self, model: nn.Module, example: torch.Tensor, tag: str) -> Path:
        path = self.folder / f"{tag}_fp32.onnx"
        export_onnx(copy.deepcopy(model).eval(), example, path, opset=13)
        return path

    def ours(self, model: nn.Module, example: torch.Tensor, calib: DataLoader, method: str, tag: str) -> Path:
        qmodel = quant.prepare(copy.deepcopy(model), "onnxruntime")
        ptq.calibrate(qmodel, calib, method, percentile=99.99)
        path = self.folder / f"{tag}_ours_{method}.onnx"
        export_onnx(qmodel, example, path, opset=13, target="onnxruntime")
        return path

    def theirs(self, fp32_path: Path, calib: DataLoader, method: str, tag: str) -> Path:
        pre = self.folder / f"{tag}_fp32_pre.onnx"
        if not pre.exists():
            quant_pre_process(str(fp32_path), str(pre))
        path = self.folder / f"{tag}_ort_{method}.onnx"
        with contextlib.redirect_stdout(io.StringIO()):  # the percentile calibrator prints progress
            quantize_static(
                str(pre), str(path), LoaderReader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=ORT_METHODS[method],
                extra_options={"CalibPercentile": 99.99} if method == "percentile" else None,
            )
        return path


def top1(run: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader) -> float:
    correct = total = 0
    for x, y in loader:
        correct += int((run(x).argmax(1) == y).sum())
        total += len(y)
    return correct / total


def op_counts(path: Path) -> Counter[str]:
    return Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


def print_op_diff(ours: Path, theirs: Path) -> None:
    a, b = op_counts(ours), op_counts(theirs)
    print("op types in the optimised graphs (ours / quantize_static):")
    for op in sorted(set(a) | set(b)):
        mark = "" if a[op] == b[op] else "   <-- differs"
        print(f"  {op:28s} {a[op]:4d} / {b[op]:4d}{mark}")


def p50_ms(engines: dict[str, OrtEngine], sample: torch.Tensor, iters: int) -> dict[str, float]:
    """p50 latency at batch 8 (``sample`` repeated, as compress.export.bench.latency builds it) after 5
    warm-up runs; the engines take turns run by run, in a rotating order."""
    x = sample[:1].expand(8, *sample.shape[1:]).contiguous()
    times = interleaved_ms({name: (lambda e=engine: e(x)) for name, engine in engines.items()}, iters)
    return {name: float(np.percentile(ts, 50)) for name, ts in times.items()}


def latency_section(build: Builder, name: str, levels: list[Optimization], iters: int) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    example = torch.zeros(1, 3, 224, 224)
    calib = bench_models.digits("train", size=224, channels=3, batch_size=32, limit=256)
    fp32 = build.fp32(model, example, name)
    paths = {"FP32": fp32, "ours INT8": build.ours(model, example, calib, "max", name),
             "quantize_static INT8": build.theirs(fp32, calib, "max", name)}
    engines = {(kind, level): build.engine(path, level) for kind, path in paths.items() for level in levels}
    sample = next(iter(calib))[0][:1]
    p50 = p50_ms({f"{kind} @{level.value}": e for (kind, level), e in engines.items()}, sample, iters)
    print(f"{name} 224x224 batch 8, p50 latency over {iters} iters (all {len(engines)} sessions round-robin, "
          "spinning off):")
    for key, ms in p50.items():
        print(f"  {key:30s}: {ms:8.2f} ms")
    at = p50
    for level in levels:
        v = level.value
        print(f"  @{v}: ours INT8 / FP32 = {at[f'ours INT8 @{v}'] / at[f'FP32 @{v}']:.3f} (target <= 0.22); "
              f"ours / quantize_static = {at[f'ours INT8 @{v}'] / at[f'quantize_static INT8 @{v}']:.3f} "
              f"(target <= 1.1); quantize_static / FP32 = {at[f'quantize_static INT8 @{v}'] / at[f'FP32 @{v}']:.3f}")
    if len(levels) > 1:
        lo, hi = levels[0].value, levels[-1].value
        print(f"  ours INT8 @{lo} / FP32 @{hi} = {at[f'ours INT8 @{lo}'] / at[f'FP32 @{hi}']:.3f}; "
              f"FP32 @{lo} / FP32 @{hi} = {at[f'FP32 @{lo}'] / at[f'FP32 @{hi}']:.3f}")
    ours_engine, theirs_engine = (engines[(k, levels[-1])].path for k in ("ours INT8", "quantize_static INT8"))
    print(f"  int8_summary ours           : {int8_summary(ours_engine)}")
    print(f"  int8_summary quantize_static: {int8_summary(theirs_engine)}")
    print_op_diff(ours_engine, theirs_engine)


def accuracy_section(build: Builder, name: str, model: nn.Module, size: int, channels: int) -> None:
    example = torch.zeros(1, channels, size, size)
    calib = bench_models.digits("train", size, channels, batch_size=64, limit=512)
    test = bench_models.digits("test", size, channels, batch_size=64)
    fp32 = build.fp32(model, example, name)
    print(f"{name}: top1 on digits test (360), calibrated on 512 train samples")
    print(f"  FP32 ONNX                          : {top1(build.engine(fp32), test):.4f}")
    for method in ORT_METHODS:
        ours = top1(build.engine(build.ours(model, example, calib, method, name)), test)
        theirs = top1(build.engine(build.theirs(fp32, calib, method, name)), test)
        verdict = "ours >= theirs" if ours >= theirs else "ours < theirs"
        print(f"  ours INT8 ({method:10s})            : {ours:.4f}")
        print(f"  quantize_static INT8 ({ORT_METHODS[method].name:10s}) : {theirs:.4f}   -> {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--levels", default="extended,all", help="session levels to time, lowest first")
    parser.add_argument("--models", default="resnet18,mobilenet_v2", help="torchvision models to time")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--skip-accuracy", action="store_true", help="latency only")
    args = parser.parse_args()
    levels = sorted((Optimization(v) for v in args.levels.split(",")), key=list(Optimization).index)
    torch.manual_seed(0)
    start = time.perf_counter()
    print(f"onnxruntime {ort.__version__}, CPUExecutionProvider, intra_op threads {args.threads}, "
          f"session levels {[lv.value for lv in levels]}, load average at start {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        build = Builder(Path(tmp), args.threads, levels[-1])  # accuracy at the highest level asked
        for name in args.models.split(","):
            latency_section(build, name, levels, args.iters)
            print()
        if not args.skip_accuracy:
            accuracy_section(build, "resnet18_32", *bench_models.resnet18())
            accuracy_section(build, "digits_cnn_8", *bench_models.digits_cnn())
    print(f"(benchmark wall time {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
