"""INT8 accuracy of the fake-quantized model: FP32 vs PTQ (each calibrator) vs QAT.

usage: python benchmarks/quant_accuracy.py [--model digits_cnn|resnet18|mobilenet_v2|densenet|all] [--qat-epochs 2] [--qat-lr 1e-3]
                                          [--epochs 4] [--lr 0.05] [--seed 0] [--cache DIR] [--layers]

Models: digits_cnn (8x8 digits) and torchvision resnet18 (digits upscaled to 32x32 RGB), both from
bench_models. Measured: top-1 on the digits test split (360 samples, so one sample is 0.28 pt) of
- the FP32 model;
- PTQ: ``quant.prepare(model, "tensorrt")`` + ``ptq.calibrate`` with each calibrator (max,
  percentile 99.99, entropy, mse, and auto: per quantizer the least error downstream) on the first 512 train
  samples;
- QAT: the best PTQ model (highest top-1, ties to the earlier calibrator) fine-tuned with
  ``compress.finetune`` + ``QatCallback`` on the shuffled train split (1437 samples), the same
  epochs/lr for both models, no test-set model selection (the last epoch is kept).
drop = FP32 top-1 - quantized top-1 in points (negative: the quantized model is better).
time s: one run's wall time of the calibrate call (PTQ) or of the fine-tune (QAT); for best-of-3
calibration timings see modelopt_compare.py.
Targets: best PTQ drop <= 0.3 pt, QAT drop <= 0.1 pt.

Engine section (``--model mobilenet_v2|densenet``, in ``all``): torchvision MobileNetV2 (width 0.5) and
a small DenseNet (growth 12, blocks 4-4-4, 24 initial features), num_classes 10, trained ``--epochs``
on the shuffled digits train split at 32x32 RGB (in memory; every file in a temporary folder). Top-1
on the digits test split of ONNX Runtime engines (level ``all``, 2 threads):
- FP32: the float model through ``export_onnx``;
- ours: ``quant.prepare(.., "onnxruntime")`` + ``ptq.calibrate`` with each calibrator on the first 512
  train samples, ``export_onnx(.., target="onnxruntime")``;
- ORT: ``quantize_static`` (QDQ, per channel, QUInt8 activations, QInt8 weights, after
  ``quant_pre_process``) with Entropy and MinMax on the same FP32 ONNX and the same 512 samples.
Targets: each of ours within 0.5 pt of FP32; our entropy within 0.3 pt of ORT Entropy.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

import compress
import compress.metrics
import compress.qat
from compress import ptq, quant
from compress.data import build_loader
from compress.export.onnx import export_onnx
from compress.export.onnxruntime import Optimization, build_engine
from compress.recipe import DigitsData

sys.path.insert(0, str(Path(__file__).parent))

import bench_models  # noqa: E402

MODELS: dict[str, Callable[[], tuple[nn.Module, int, int]]] = {
    "digits_cnn": bench_models.digits_cnn,
    "resnet18": bench_models.resnet18,
}
METHODS = ("max", "percentile", "entropy", "mse", "auto")
CALIB_SAMPLES = 512
TARGET = "tensorrt"
PTQ_TARGET, QAT_TARGET = 0.3, 0.1
ENGINE_FP32_DROP, ENGINE_VS_ORT = 0.5, 0.3
ENGINE_MODELS: dict[str, tuple[str, dict]] = {
    "mobilenet_v2": ("torchvision.models:mobilenet_v2", {"num_classes": 10, "width_mult": 0.5}),
    "densenet": ("torchvision.models.densenet:DenseNet",
                 {"growth_rate": 12, "block_config": [4, 4, 4], "num_init_features": 24, "num_classes": 10}),
}


def digits_loader(split: str, size: int, channels: int, limit: int | None = None, batch_size: int = 64) -> DataLoader:
    """The digits split, in order, upscaled to ``size`` with ``channels`` channels."""
    return bench_models.digits(split, size, channels, batch_size=batch_size, limit=limit)


def train_engine_model(name: str, epochs: int, lr: float = 0.05, seed: int = 0, cache: Path | None = None) -> nn.Module:
    """``ENGINE_MODELS[name]`` trained ``epochs`` on the shuffled digits train split at 32x32 RGB (in memory),
    from initial weights and shuffling of ``seed``; with ``cache``, the weights are kept there and reused."""
    factory, kwargs = ENGINE_MODELS[name]
    torch.manual_seed(seed)
    model = compress.build(factory, kwargs)
    saved = cache / f"{name}-e{epochs}-lr{lr:g}-s{seed}.pt" if cache else None
    if saved is not None and saved.exists():
        model.load_state_dict(torch.load(saved))
        return model.eval()
    config = compress.FinetuneConfig(epochs=epochs, lr=lr, seed=seed, keep_best=False)
    compress.finetune(model, shuffled_train(32, 3, seed), config, progress=False, reshard=True)
    if saved is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), saved)
    return model.eval()


@dataclass
class Row:
    label: str
    top1: float  # percent
    seconds: float | None = None


@dataclass
class Result:
    model: str
    fp32: float
    ptq: list[Row]
    qat: Row

    @property
    def best_ptq(self) -> Row:
        return max(self.ptq, key=lambda r: r.top1)  # max keeps the first of equal scores

    def drop(self, row: Row) -> float:
        return self.fp32 - row.top1


def top1(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * compress.metrics.score("top1", compress.metrics.collect(model, loader))["top1"]


def shuffled_train(size: int, channels: int, seed: int = 0) -> DataLoader:
    spec = DigitsData(source="digits", split="train", size=size, channels=channels, batch_size=64, shuffle=True)
    return build_loader(spec, "digits:train", seed=seed)


def run_ptq(model: nn.Module, calib: DataLoader, method: str) -> tuple[nn.Module, float]:
    """The calibrated fake-quant copy of ``model`` and the calibrate call's wall time."""
    qmodel = quant.prepare(copy.deepcopy(model), TARGET)
    start = time.perf_counter()
    ptq.calibrate(qmodel, calib, method, limit=CALIB_SAMPLES)
    return qmodel, time.perf_counter() - start


def run_qat(qmodel: nn.Module, train: DataLoader, epochs: int, lr: float) -> tuple[nn.Module, float]:
    """A fine-tuned copy of the calibrated ``qmodel`` and the fine-tune wall time."""
    work = copy.deepcopy(qmodel)
    config = compress.FinetuneConfig(epochs=epochs, lr=lr, seed=0)
    start = time.perf_counter()
    compress.finetune(work, train, config, callbacks=[compress.qat.QatCallback()], progress=False, reshard=True)
    return work.eval(), time.perf_counter() - start


def measure(name: str, epochs: int, lr: float) -> Result:
    torch.manual_seed(0)
    model, size, channels = MODELS[name]()
    test = bench_models.digits("test", size, channels)
    calib = bench_models.digits("train", size, channels, limit=CALIB_SAMPLES)
    fp32 = top1(model, test)
    rows, qmodels = [], {}
    for method in METHODS:
        qmodels[method], seconds = run_ptq(model, calib, method)
        rows.append(Row(f"PTQ {method}", top1(qmodels[method], test), seconds))
    best = max(rows, key=lambda r: r.top1)
    qat_model, seconds = run_qat(qmodels[best.label.removeprefix("PTQ ")], shuffled_train(size, channels), epochs, lr)
    qat = Row(f"QAT from {best.label.removeprefix('PTQ ')} ({epochs} ep, lr {lr:g})", top1(qat_model, test), seconds)
    return Result(name, fp32, rows, qat)


def print_result(result: Result, qat: bool = True) -> None:
    target = TARGET if qat else "onnxruntime"
    print(f"\n{result.model}  (target {target}, calibration {CALIB_SAMPLES} train samples, test 360 samples)")
    print(f"{'':38s} {'top1 %':>8s} {'drop pt':>8s} {'time s':>8s}")
    print(f"{'FP32':38s} {result.fp32:8.2f} {'':>8s} {'':>8s}")
    for row in [*result.ptq, result.qat] if qat else result.ptq:
        seconds = f"{row.seconds:8.2f}" if row.seconds is not None else ""
        print(f"{row.label:38s} {row.top1:8.2f} {result.drop(row):+8.2f} {seconds}")


def engine_top1(onnx_path: Path, test: DataLoader) -> float:
    """Top-1 in percent of ``onnx_path`` built as an ONNX Runtime engine (level all, 2 threads)."""
    engine = build_engine(onnx_path, onnx_path.with_suffix(".engine.onnx"), threads=2, level=Optimization.all)
    correct = total = 0
    for x, y in test:
        correct += int((engine(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


def ort_quantize(fp32: Path, calib: DataLoader, method: str) -> Path:
    """``quantize_static`` of ``fp32`` with ORT's ``method`` calibration on ``calib``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from ort_int8_latency import LoaderReader

    pre = fp32.with_name("fp32_pre.onnx")
    if not pre.exists():
        quant_pre_process(str(fp32), str(pre))
    out = fp32.with_name(f"ort_{method}.onnx")
    with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print progress
        quantize_static(str(pre), str(out), LoaderReader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method))
    return out


def measure_engine(name: str, epochs: int, folder: Path, lr: float = 0.05, seed: int = 0,
                   cache: Path | None = None, layers: bool = False) -> Result:
    """FP32, our four calibrators and ORT's Entropy/MinMax, all as ONNX Runtime engines.

    ``layers``: also print each quantizer whose entropy amax is below 0.9 x its max-calibrated amax."""
    start = time.perf_counter()
    model = train_engine_model(name, epochs, lr, seed, cache)
    print(f"  {name}: trained {epochs} epochs (lr {lr:g}, seed {seed}) in {time.perf_counter() - start:.0f} s")
    test = digits_loader("test", 32, 3)
    calib = digits_loader("train", 32, 3, limit=CALIB_SAMPLES)
    example = torch.zeros(1, 3, 32, 32)
    fp32 = folder / "fp32.onnx"
    export_onnx(copy.deepcopy(model), example, fp32)
    rows, tables = [], {}
    for method in METHODS:
        qmodel = quant.prepare(copy.deepcopy(model), "onnxruntime")
        start = time.perf_counter()
        cal = ptq.calibrate(qmodel, calib, method, limit=CALIB_SAMPLES)
        tables[method] = {r.name: r for r in cal.layers}
        seconds = time.perf_counter() - start
        path = folder / f"ours_{method}.onnx"
        export_onnx(qmodel, example, path, target="onnxruntime")
        rows.append(Row(f"ours {method}", engine_top1(path, test), seconds))
        worst = max(cal.layers, key=lambda r: r.clipped)
        print(f"  {name} {method}: {len(cal.warnings)} layer warning(s); most clipped "
              f"{worst.name} {100 * worst.clipped:.3f} % (amax {worst.amax:.3f}, max {worst.max:.3f})")
    if layers:
        print(f"  {name}: quantizers whose entropy amax < 0.9 x max (max amax, entropy amax, clipped %)")
        for qname, row in tables["entropy"].items():
            top = tables["max"][qname].amax
            if row.amax < 0.9 * top:
                print(f"    {qname:60s} {top:8.3f} {row.amax:8.3f} {100 * row.clipped:7.3f}")
    for method in ("Entropy", "MinMax"):
        start = time.perf_counter()
        path = ort_quantize(fp32, calib, method)
        rows.append(Row(f"ORT quantize_static {method}", engine_top1(path, test), time.perf_counter() - start))
    return Result(f"{name} (ONNX Runtime engine, {epochs} epochs, seed {seed})", engine_top1(fp32, test), rows,
                  Row("(no QAT in the engine section)", float("nan")))


def print_engine_summary(result: Result) -> None:
    ours = {r.label: r for r in result.ptq}
    for method in METHODS:
        drop = result.drop(ours[f"ours {method}"])
        print(f"{result.model}: ours {method} drop vs FP32 = {drop:+.2f} pt (target <= {ENGINE_FP32_DROP})")
    gap = ours["ORT quantize_static Entropy"].top1 - ours["ours entropy"].top1
    print(f"{result.model}: ORT Entropy - ours entropy = {gap:+.2f} pt (target <= {ENGINE_VS_ORT})")


def print_summary(results: list[Result]) -> None:
    print()
    for r in results:
        best = r.best_ptq
        print(f"{r.model}: best PTQ drop = {r.drop(best):+.2f} pt ({best.label}) (target <= {PTQ_TARGET})")
        print(f"{r.model}: QAT drop = {r.drop(r.qat):+.2f} pt (target <= {QAT_TARGET})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*MODELS, *ENGINE_MODELS, "all"], default="all")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs of the engine-section models")
    parser.add_argument("--lr", type=float, default=0.05, help="learning rate of the engine-section models")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and shuffling of the engine-section models")
    parser.add_argument("--cache", type=Path, help="keep/reuse the trained engine-section models in this folder")
    parser.add_argument("--layers", action="store_true", help="print the quantizers entropy clips below 0.9 x max")
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--qat-lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.manual_seed(0)
    names = [*MODELS, *ENGINE_MODELS] if args.model == "all" else [args.model]
    results, engine_results = [], []
    for name in names:
        if name in ENGINE_MODELS:
            with tempfile.TemporaryDirectory() as folder:
                engine_results.append(measure_engine(name, args.epochs, Path(folder), args.lr, args.seed,
                                                     args.cache, args.layers))
            print_result(engine_results[-1], qat=False)
        else:
            results.append(measure(name, args.qat_epochs, args.qat_lr))
            print_result(results[-1])
    if results:
        print_summary(results)
    for result in engine_results:
        print_engine_summary(result)


if __name__ == "__main__":
    main()
