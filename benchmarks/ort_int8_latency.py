"""ONNX Runtime CPU: our onnxruntime-target INT8 export against FP32 and against ORT's own quantize_static.

usage: python benchmarks/ort_int8_latency.py [--level extended|all] [--threads 2] [--iters 60]

Latency: torchvision resnet18 (num_classes 10; the digits-32 weights, latency does not depend on
them) at 224x224, batch 8, p50 over ``--iters`` runs after 5 warm-up runs; the three engines take
turns run by run, so background load hits all alike.
  (1) FP32: the float model through ``export_onnx``.
  (2) ours: ``quant.prepare(.., "onnxruntime")`` + ``ptq.calibrate(.., "max")`` on 256 digits images
      upscaled to 224 RGB, ``export_onnx(.., target="onnxruntime")``.
  (3) theirs: ``quant_pre_process`` then ``quantize_static`` on (1): QDQ, per_channel, QUInt8
      activations, QInt8 weights, MinMax, the same 256 images through a CalibrationDataReader.
All three are built by ``build_engine`` with the same session options (threads, optimisation level).
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
from compress.export.onnxruntime import Optimization, OrtEngine, build_engine, int8_summary  # noqa: E402

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

    def engine(self, onnx_path: Path) -> OrtEngine:
        return build_engine(onnx_path, onnx_path.with_suffix(".engine.onnx"), threads=self.threads, level=self.level)

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
    warm-up runs; the engines take turns run by run so background load hits all alike."""
    x = sample[:1].expand(8, *sample.shape[1:]).contiguous()
    times = interleaved_ms({name: (lambda e=engine: e(x)) for name, engine in engines.items()}, iters)
    return {name: float(np.percentile(ts, 50)) for name, ts in times.items()}


def latency_section(build: Builder, iters: int) -> tuple[Path, Path]:
    model, _, _ = bench_models.resnet18()
    example = torch.zeros(1, 3, 224, 224)
    calib = bench_models.digits("train", size=224, channels=3, batch_size=32, limit=256)
    fp32 = build.fp32(model, example, "r224")
    paths = {"FP32": fp32, "ours INT8": build.ours(model, example, calib, "max", "r224"),
             "quantize_static INT8": build.theirs(fp32, calib, "max", "r224")}
    engines = {name: build.engine(path) for name, path in paths.items()}
    sample = next(iter(calib))[0][:1]
    p50 = p50_ms(engines, sample, iters)
    print(f"resnet18 224x224 batch 8, p50 latency over {iters} iters (engines interleaved):")
    for name, ms in p50.items():
        print(f"  {name:22s}: {ms:8.2f} ms")
    ours_engine, theirs_engine = (engines[k].path for k in ("ours INT8", "quantize_static INT8"))
    print(f"int8_summary ours           : {int8_summary(ours_engine)}")
    print(f"int8_summary quantize_static: {int8_summary(theirs_engine)}")
    print_op_diff(ours_engine, theirs_engine)
    print(f"ours INT8 / FP32 latency = {p50['ours INT8'] / p50['FP32']:.3f} (target <= 0.22)")
    print(f"ours / quantize_static latency = {p50['ours INT8'] / p50['quantize_static INT8']:.3f} (target <= 1.1)")
    print(f"quantize_static INT8 / FP32 latency = {p50['quantize_static INT8'] / p50['FP32']:.3f}")
    return ours_engine, theirs_engine


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
    parser.add_argument("--level", choices=[o.value for o in Optimization], default="extended")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=60)
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    print(f"onnxruntime {ort.__version__}, CPUExecutionProvider, intra_op threads {args.threads}, "
          f"graph optimisation {args.level}, load average at start {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        build = Builder(Path(tmp), args.threads, Optimization(args.level))
        latency_section(build, args.iters)
        print()
        accuracy_section(build, "resnet18_32", *bench_models.resnet18())
        accuracy_section(build, "digits_cnn_8", *bench_models.digits_cnn())
    print(f"(benchmark wall time {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
